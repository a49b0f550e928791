-- Player tokens expire (TOKEN_TTL_S after token_issued_at) and can be revoked by the admin
-- API; a new token (POST /api/admin/users/{id}/token) replaces the hash and both marks.
ALTER TABLE users
    ADD COLUMN token_issued_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN token_revoked_at timestamptz;
UPDATE users SET token_issued_at = created_at;
