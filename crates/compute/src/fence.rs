//! [`Fence`]: which controller may take a replica process over (`ComputeCommand::Hello`'s rule).
//!
//! **The rule.** The process remembers the highest controller epoch it has served and the session that
//! holds it. A controller that said `Hello` (after authenticating) is admitted, replacing the active
//! connection, if
//! - its epoch is higher than the highest served (a newer controller takes over), or
//! - its epoch equals the highest and its session is the holder's (the same controller reconnecting,
//!   perhaps before this process noticed its old connection was dead), or
//! - its epoch equals the highest and no connection is active (the holder is gone; a controller
//!   restarted without a new epoch gets back in).
//!
//! Otherwise it is refused with the highest epoch (`ComputeResponse::Fenced`) and the active connection
//! is untouched: a lower epoch always; the highest epoch from another session while a connection is
//! active (two controllers claiming one epoch: the first keeps the replica).
//!
//! **Where epochs come from.** The controller's configuration (`ControllerConfig::epoch`), which the
//! service embedding the controller raises at every takeover. The process keeps its highest epoch in
//! memory only: a restarted process admits the first authenticated controller, and a newer one takes it
//! back at its next (re)connection.
//!
//! **Tests.** `mod tests` below (the rule, as a table); through the socket in `tests/it/security.rs` and
//! against a `compute-replica` process in `tests/it/adversarial.rs`.

use protocol::ControllerEpoch;

/// The highest epoch served and the session holding it. See the module documentation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Fence {
    highest: Option<(ControllerEpoch, u64)>,
}

impl Fence {
    /// Whether a controller of `epoch` and `session` may take over, given whether a connection is
    /// `active`; records it if so. A refusal carries the highest epoch served.
    pub fn admit(
        &mut self,
        epoch: ControllerEpoch,
        session: u64,
        active: bool,
    ) -> Result<(), ControllerEpoch> {
        let admitted = match self.highest {
            None => true,
            Some((highest, holder)) => {
                epoch > highest || (epoch == highest && (session == holder || !active))
            }
        };
        match self.highest {
            Some((highest, _)) if !admitted => Err(highest),
            _ => {
                self.highest = Some((epoch, session));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controller_takes_over_only_with_a_higher_epoch_or_as_the_same_session() {
        let e = ControllerEpoch;
        // (served so far: epoch and session, the newcomer's epoch and session, a connection active,
        //  admitted or refused with the highest epoch)
        type Case = (Option<(u64, u64)>, (u64, u64), bool, Result<(), u64>);
        let table: [Case; 9] = [
            (None, (0, 1), false, Ok(())),
            (Some((3, 1)), (4, 2), true, Ok(())),
            (Some((3, 1)), (4, 2), false, Ok(())),
            (Some((3, 1)), (3, 1), true, Ok(())),
            (Some((3, 1)), (3, 2), true, Err(3)),
            (Some((3, 1)), (3, 2), false, Ok(())),
            (Some((3, 1)), (2, 1), true, Err(3)),
            (Some((3, 1)), (2, 9), false, Err(3)),
            (Some((3, 1)), (0, 1), false, Err(3)),
        ];
        for (served, (epoch, session), active, expected) in table {
            let mut fence = Fence { highest: served.map(|(epoch, session)| (e(epoch), session)) };
            let before = fence.clone();
            let outcome = fence.admit(e(epoch), session, active);
            assert_eq!(
                outcome,
                expected.map_err(e),
                "served {served:?}, newcomer {epoch}/{session}, active {active}"
            );
            match outcome {
                Ok(()) => {
                    assert_eq!(fence.highest, Some((e(epoch), session)), "the newcomer holds the epoch")
                }
                Err(_) => assert_eq!(fence, before, "a refusal changes nothing"),
            }
        }
    }
}
