-- Profile cache invalidation (referral-service/src/profile_cache.rs): every committed change to
-- what GetProfile shows notifies `refsys_profiles` with the id of each user whose profile
-- changed, whichever process wrote it. NOTIFY is delivered at commit (never for a rollback),
-- and Postgres sends one notification per distinct payload per transaction.
--
-- A profile shows the user's own row (names, e-mail, roles, the inviter's invite code, which
-- never changes), their counters (points, invitee count), and their invitees' ids, masked
-- phone numbers and activation times: so a change to an invitee's link or phone number is the
-- inviter's change too.
CREATE FUNCTION notify_profile_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'user_counters' THEN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('refsys_profiles', OLD.user_id::text);
        ELSE
            PERFORM pg_notify('refsys_profiles', NEW.user_id::text);
        END IF;
        RETURN NULL;
    END IF;
    PERFORM pg_notify('refsys_profiles', NEW.id::text);
    IF OLD.invited_by IS NOT NULL AND OLD.invited_by IS DISTINCT FROM NEW.invited_by THEN
        PERFORM pg_notify('refsys_profiles', OLD.invited_by::text);
    END IF;
    IF NEW.invited_by IS NOT NULL
       AND (NEW.invited_by IS DISTINCT FROM OLD.invited_by
            OR NEW.invite_activated_at IS DISTINCT FROM OLD.invite_activated_at
            OR NEW.phone_number IS DISTINCT FROM OLD.phone_number) THEN
        PERFORM pg_notify('refsys_profiles', NEW.invited_by::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER users_profile_changed
    AFTER UPDATE ON users
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION notify_profile_changed();

CREATE TRIGGER user_counters_profile_changed
    AFTER INSERT OR UPDATE OR DELETE ON user_counters
    FOR EACH ROW EXECUTE FUNCTION notify_profile_changed();
