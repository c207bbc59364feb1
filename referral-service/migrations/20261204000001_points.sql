-- Points: internal services (PointsService) and admins (AdminService.GrantPoints) redeem and
-- grant points. Both are ledger entries beside the activation bonuses; the ledger stays
-- append-only (its triggers are unchanged) and balances stay sums of user_counters shards.

-- Two more kinds of entry: 'redeemed' (negative) and 'granted' (positive). They belong to no
-- activation and have no counterpart, but carry the caller's reason (`note`) and who asked
-- (`requested_by`: the service client id, or 'admin:<user id>'). Activation entries keep both
-- ids, and bonus_ledger_once_per_activation (activation_id, reason) still allows one entry of
-- each activation kind per activation; NULL activation ids never collide.
ALTER TABLE bonus_ledger DROP CONSTRAINT bonus_ledger_reason_check;
ALTER TABLE bonus_ledger ADD CONSTRAINT bonus_ledger_reason_check
    CHECK (reason IN ('invite_code_activated', 'invitee_joined', 'redeemed', 'granted'));
ALTER TABLE bonus_ledger
    ALTER COLUMN counterpart_user_id DROP NOT NULL,
    ALTER COLUMN activation_id DROP NOT NULL,
    ADD COLUMN note text,
    ADD COLUMN requested_by text;
ALTER TABLE bonus_ledger ADD CONSTRAINT bonus_ledger_kind_columns CHECK (
    CASE WHEN reason IN ('invite_code_activated', 'invitee_joined')
         THEN counterpart_user_id IS NOT NULL AND activation_id IS NOT NULL
              AND note IS NULL AND requested_by IS NULL
         ELSE counterpart_user_id IS NULL AND activation_id IS NULL
              AND note IS NOT NULL AND requested_by IS NOT NULL
              AND (amount < 0) = (reason = 'redeemed') AND amount <> 0
    END
);

-- One row per (caller, idempotency key) of RedeemPoints/GrantPoints: a hash of the request
-- (kind, user, points, reason) and its result (the ledger entry and the balance right after
-- it), inserted in the same transaction as the entry. A parallel retry's insert waits on the
-- primary key until the first commits, then reads this row. Refused requests roll back and
-- leave no row. Rows are pruned after 48 hours (keys are promised for at least 24).
CREATE TABLE points_requests (
    caller          text        NOT NULL,
    idempotency_key text        NOT NULL,
    request_hash    bytea       NOT NULL,
    -- NULL only inside the inserting transaction, before the ledger entry exists.
    ledger_entry_id bigint      REFERENCES bonus_ledger (id),
    balance_after   bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, idempotency_key),
    CONSTRAINT points_requests_hash_length CHECK (octet_length(request_hash) = 32),
    CONSTRAINT points_requests_result_complete
        CHECK ((ledger_entry_id IS NULL) = (balance_after IS NULL))
);
-- Pruning by age.
CREATE INDEX points_requests_created_idx ON points_requests (created_at);
