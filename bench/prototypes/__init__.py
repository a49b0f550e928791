"""Prototypes of the bet path measured for docs/decisions.md (how the roll meets the nonce)."""
