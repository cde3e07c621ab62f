//! The pure reconcile: for one (asset, uri) key, what the desired state, the recorded state and
//! the queue say, and what must happen. No SQL, no HTTP. The streaming merge that applies it to a
//! whole run is [`merge`].
//!
//! The queue holds *targets* (what Bynder must end up holding for a key), not requests, so a
//! create followed by a delete before anything was sent simply cancels, and the latest
//! `additional` wins.

pub mod merge;

/// What the CMS wants for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired<'a> {
    /// A valid row asks for a usage with this note.
    Present(&'a str),
    /// A row exists but is invalid: leave whatever Bynder holds for it alone.
    Hold,
    /// No row: Bynder must hold no usage of ours.
    Absent,
}

/// What Bynder must end up holding for a key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", content = "additional", rename_all = "snake_case")]
pub enum Target {
    Upsert(String),
    Delete,
}

/// An operation already in the queue for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub target: Target,
    pub dead: bool,
    /// A request for it may have reached Bynder unseen; it must be read back before anything else.
    pub uncertain: bool,
}

/// The kind of change an enqueued target makes, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Create,
    /// Bynder has no update: a delete of the (asset, uri) then a create.
    Update,
    Delete,
    /// Recorded and desired agree, but an earlier request's outcome is unknown: read back.
    Verify,
}

/// What to do for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Already right, or already queued (or dead-lettered) with this very target.
    Nothing,
    /// Queue this target, replacing any queued operation for the key.
    Enqueue { target: Target, change: Change },
    /// A queued operation is no longer needed.
    Cancel,
}

/// Decides one key. `recorded` is the note of the usage we know Bynder holds, if any.
pub fn decide(desired: Desired<'_>, recorded: Option<&str>, queued: Option<&Queued>) -> Decision {
    let wanted: Option<&str> = match desired {
        Desired::Present(additional) => Some(additional),
        Desired::Absent => None,
        // An invalid row keeps the key as it is: neither a new create nor a delete of a usage
        // the CMS evidently still has. A queued operation stays as it was.
        Desired::Hold => return Decision::Nothing,
    };
    let target = match wanted {
        Some(additional) => Target::Upsert(additional.to_owned()),
        None => Target::Delete,
    };
    if wanted == recorded {
        return match queued {
            None => Decision::Nothing,
            // The outcome of an earlier request is unknown: keep checking, now towards this target.
            Some(q) if q.uncertain => {
                if q.target == target {
                    Decision::Nothing
                } else {
                    Decision::Enqueue {
                        target,
                        change: Change::Verify,
                    }
                }
            }
            Some(_) => Decision::Cancel,
        };
    }
    if queued.is_some_and(|q| q.target == target) {
        // Pending with this target, or dead-lettered for it: a dead letter is retried only
        // when the row changes (a new target) or on `queue retry`.
        return Decision::Nothing;
    }
    let change = match (recorded, wanted) {
        (None, Some(_)) => Change::Create,
        (Some(_), Some(_)) => Change::Update,
        (_, None) => Change::Delete,
    };
    Decision::Enqueue { target, change }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(target: Target, dead: bool, uncertain: bool) -> Queued {
        Queued {
            target,
            dead,
            uncertain,
        }
    }

    fn up(s: &str) -> Target {
        Target::Upsert(s.to_owned())
    }

    #[test]
    fn a_new_row_is_created_and_a_vanished_row_deleted() {
        assert_eq!(
            decide(Desired::Present("hero"), None, None),
            Decision::Enqueue {
                target: up("hero"),
                change: Change::Create
            }
        );
        assert_eq!(
            decide(Desired::Absent, Some("hero"), None),
            Decision::Enqueue {
                target: Target::Delete,
                change: Change::Delete
            }
        );
    }

    #[test]
    fn a_changed_note_is_an_update_and_an_unchanged_row_does_nothing() {
        assert_eq!(
            decide(Desired::Present("new"), Some("old"), None),
            Decision::Enqueue {
                target: up("new"),
                change: Change::Update
            }
        );
        assert_eq!(
            decide(Desired::Present("same"), Some("same"), None),
            Decision::Nothing
        );
        assert_eq!(decide(Desired::Absent, None, None), Decision::Nothing);
    }

    #[test]
    fn a_create_followed_by_a_delete_before_sending_cancels_out() {
        let queued = q(up("hero"), false, false);
        assert_eq!(
            decide(Desired::Absent, None, Some(&queued)),
            Decision::Cancel
        );
    }

    #[test]
    fn the_latest_note_wins_over_a_queued_one() {
        let queued = q(up("first"), false, false);
        assert_eq!(
            decide(Desired::Present("second"), None, Some(&queued)),
            Decision::Enqueue {
                target: up("second"),
                change: Change::Create
            }
        );
        assert_eq!(
            decide(Desired::Present("first"), None, Some(&queued)),
            Decision::Nothing
        );
    }

    #[test]
    fn a_dead_letter_waits_until_its_row_changes() {
        let dead = q(up("x"), true, false);
        assert_eq!(
            decide(Desired::Present("x"), None, Some(&dead)),
            Decision::Nothing
        );
        assert_eq!(
            decide(Desired::Present("y"), None, Some(&dead)),
            Decision::Enqueue {
                target: up("y"),
                change: Change::Create
            }
        );
        assert_eq!(decide(Desired::Absent, None, Some(&dead)), Decision::Cancel);
    }

    #[test]
    fn an_uncertain_create_is_never_simply_cancelled() {
        // The create may have reached Bynder: the key must be read back and removed if present.
        let uncertain = q(up("x"), false, true);
        assert_eq!(
            decide(Desired::Absent, None, Some(&uncertain)),
            Decision::Enqueue {
                target: Target::Delete,
                change: Change::Verify
            }
        );
        let uncertain_delete = q(Target::Delete, false, true);
        assert_eq!(
            decide(Desired::Absent, None, Some(&uncertain_delete)),
            Decision::Nothing
        );
    }

    #[test]
    fn an_invalid_row_leaves_the_recorded_usage_and_the_queue_alone() {
        assert_eq!(decide(Desired::Hold, Some("x"), None), Decision::Nothing);
        assert_eq!(
            decide(Desired::Hold, None, Some(&q(up("x"), false, false))),
            Decision::Nothing
        );
    }
}
