"""Pure game rules of StakePro: no I/O, importable from anywhere.

``money`` parses and formats amounts, ``dice`` is the provably fair roll and the
multiplier, ``seeds`` makes and checks seeds, ``bets`` validates and settles a bet,
``commission`` splits commissions up the agent chain, ``errors`` is the one error tree,
``codes`` are the Lua scripts' reply codes, ``wallet_model`` is the pure reference of the
money scripts, and ``verify`` is the command-line verifier players can run.
"""
