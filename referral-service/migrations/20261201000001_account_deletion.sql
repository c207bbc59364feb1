-- Account deletion (UserDirectory.DeleteUser) erases the person and keeps the accounting: the
-- row stays with its id, invite code, referral link, ledger entries and counters; the phone
-- number becomes NULL (several deleted users, one unique constraint), names and e-mail become
-- empty and roles are dropped. `deleted_at` marks the row; every read of a live user filters it.

ALTER TABLE users ALTER COLUMN phone_number DROP NOT NULL;
ALTER TABLE users ADD COLUMN deleted_at timestamptz;
-- A live user has a number, a deleted one has none and keeps nothing personal.
ALTER TABLE users ADD CONSTRAINT users_phone_number_until_deleted
    CHECK ((phone_number IS NULL) = (deleted_at IS NOT NULL));
ALTER TABLE users ADD CONSTRAINT users_deleted_hold_no_personal_data
    CHECK (deleted_at IS NULL
           OR (first_name = '' AND last_name = '' AND email = '' AND roles = '{}'));

-- No planner statistics of personal columns: ANALYZE would copy sample values (numbers, names,
-- addresses, a deleted user's among them) into pg_statistic. Lookups by number go through the
-- unique index, which tells the planner they match one row; nothing filters on the others.
ALTER TABLE users
    ALTER COLUMN phone_number SET STATISTICS 0,
    ALTER COLUMN first_name SET STATISTICS 0,
    ALTER COLUMN last_name SET STATISTICS 0,
    ALTER COLUMN email SET STATISTICS 0;

-- Peppered hashes (HMAC-SHA256 keyed by PHONE_HASH_PEPPER_FILE) of the numbers of deleted users
-- who had activated an invite code and so earned the invitee bonus. When such a number signs up
-- again, activating a code links the users but awards no points to either side, so deleting
-- and re-joining cannot farm bonuses. Deliberately no user id and no time: nothing here ties a
-- hash to an account.
CREATE TABLE rewarded_phone_hashes (
    phone_hash bytea PRIMARY KEY,
    CONSTRAINT rewarded_phone_hashes_length CHECK (octet_length(phone_hash) = 32)
);
