"""Operator commands, run by hand against a deployment: the audit (``python -m ops.audit``,
``make audit``) and the balance rebuild (``python -m ops.rebuild``, ``make rebuild-balances``).
"""
