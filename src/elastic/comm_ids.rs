//! The coordinator's communicator ids, when expert rows travel over collectives between worker
//! processes (`train.exchange` `sim` or `nccl`). NCCL builds a communicator from a unique id that
//! one process makes (`ncclGetUniqueId`, which also starts the bootstrap every rank connects to)
//! and every rank receives: here the coordinator makes them, one per lane, and sends them over the
//! control plane. Each worker builds a generation of communicators with its epoch's first exchange,
//! and a new one at the first exchange after an abort, so the ids go with an epoch's setup and with
//! the first `RunStep` after an abort, the same to every member. The stand-in gets random ids and
//! checks that every rank got the same (its messages carry their digest).

use crate::actors::collectives::CommIds;
use crate::config::ExpertExchange;
use crate::error::{Error, Result};
use crate::net::collective::{nccl_unique_id, NCCL_ID_BYTES};
use crate::net::StepId;
use rand::RngCore;
use std::sync::{Mutex, PoisonError};

/// One epoch's ids, shared by the epoch's worker proxies.
#[derive(Debug)]
pub struct CommIdMaker {
    kind: ExpertExchange,
    lanes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The latest step aborted in this epoch.
    aborted: Option<StepId>,
    /// The step the latest ids were made for, and the ids.
    made: Option<(StepId, CommIds)>,
}

impl CommIdMaker {
    /// Ids of `kind`'s communicators, `lanes` per generation.
    pub fn new(kind: ExpertExchange, lanes: usize) -> Result<Self> {
        if kind == ExpertExchange::Transport {
            return Err(Error::config("the transport exchange has no communicators"));
        }
        Ok(CommIdMaker {
            kind,
            lanes,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A generation's ids: NCCL's unique ids (made here: this process hosts their bootstrap), or
    /// random ones for the stand-in.
    fn make(&self) -> Result<CommIds> {
        (0..self.lanes)
            .map(|_| match self.kind {
                ExpertExchange::Nccl => nccl_unique_id(),
                _ => {
                    let mut id = [0u8; NCCL_ID_BYTES];
                    rand::rng().fill_bytes(&mut id);
                    Ok(id)
                }
            })
            .collect()
    }

    /// The ids of the epoch's first generation, for its setups.
    pub fn for_setup(&self) -> Result<CommIds> {
        self.make()
    }

    /// `step` was aborted: the next step (or attempt) builds new communicators on every worker.
    pub fn aborted(&self, step: StepId) {
        let mut st = self.lock();
        st.aborted = Some(st.aborted.map_or(step, |a| a.max(step)));
    }

    /// The ids a `RunStep` of `step` carries: new ones on the first step after an abort (the same
    /// for every worker's call), none otherwise.
    pub fn for_step(&self, step: StepId) -> Result<Option<CommIds>> {
        let mut st = self.lock();
        let renew = match (st.aborted, &st.made) {
            (Some(aborted), Some((made, _))) => aborted < step && *made <= aborted,
            (Some(aborted), None) => aborted < step,
            (None, _) => false,
        };
        if renew {
            st.made = Some((step, self.make()?));
        }
        Ok(st
            .made
            .as_ref()
            .filter(|(made, _)| *made == step)
            .map(|(_, ids)| ids.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_go_with_the_first_step_after_an_abort_the_same_to_every_worker() {
        let maker = CommIdMaker::new(ExpertExchange::Sim, 2).expect("maker");
        let first = maker.for_setup().expect("setup ids");
        assert_eq!(first.len(), 2);
        assert_ne!(first[0], first[1], "random ids per lane");
        let s = |step, attempt| StepId { step, attempt };
        // No abort: no ids with the steps.
        assert_eq!(maker.for_step(s(0, 0)).expect("ids"), None);
        assert_eq!(maker.for_step(s(1, 0)).expect("ids"), None);
        // Step 1 aborted (told by every proxy): its replay carries new ids, the same for all.
        maker.aborted(s(1, 0));
        maker.aborted(s(1, 0));
        let a = maker.for_step(s(1, 1)).expect("ids").expect("new ids");
        let b = maker.for_step(s(1, 1)).expect("ids").expect("the same ids");
        assert_eq!(a, b);
        assert_ne!(a, first);
        // A late abort of the same attempt changes nothing; the next step carries none.
        maker.aborted(s(1, 0));
        assert_eq!(maker.for_step(s(1, 1)).expect("ids"), Some(a.clone()));
        assert_eq!(maker.for_step(s(2, 0)).expect("ids"), None);
        // The replay aborted too: its replay gets others again.
        maker.aborted(s(2, 0));
        let c = maker.for_step(s(2, 1)).expect("ids").expect("new ids");
        assert_ne!(c, a);
    }

    #[test]
    fn nccl_ids_without_nccl_are_a_clear_error() {
        let maker = CommIdMaker::new(ExpertExchange::Nccl, 1).expect("maker");
        if let Err(e) = maker.for_setup() {
            let msg = e.to_string();
            assert!(
                msg.contains("NCCL") || msg.contains("CUDA") || msg.contains("nccl"),
                "{msg}"
            );
        }
        assert!(CommIdMaker::new(ExpertExchange::Transport, 1).is_err());
    }
}
