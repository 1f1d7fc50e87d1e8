//! Network faults: a [`Transport`] wrapper that drops, duplicates, delays, reorders or corrupts the
//! requests between chosen workers, or cuts two workers apart for a while (a partition), as the
//! [`FaultPlan`] says ([`Target::Link`]).
//!
//! The same wrapper sits around the in-process transport (`net::local`) and, in each worker
//! process of a chaos run over processes, around its QUIC data plane (`net::quic::QuicTransport`):
//! `from` and `to` are worker indices of the epoch either way. A corrupt request is damaged bytes
//! where bytes travel ([`Transport::send_damaged`]), a refusal modelled here where they do not.
//!
//! Only requests are faulted (the packets that name their step: expert rows, gradients,
//! parameters, gathers); replies carry no step and pass untouched. A fault applies to the first
//! request(s) from `from` to `to` of its step, whatever the attempt. A partition is the exception:
//! it starts at such a request (either way between the two workers) and then loses every packet
//! between them, replies too, until its duration is over.

use super::{FaultKind, FaultPlan, Moment, Target};
use crate::error::{Error, Result};
use crate::net::{Packet, Payload, Transport, WorkerId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a reordered packet waits for the next one on its link before it goes anyway.
const REORDER_WAIT: Duration = Duration::from_millis(20);

/// A transport that injects the plan's link faults into the packets `inner` sends.
pub struct FaultyTransport<T: Transport> {
    inner: Arc<T>,
    plan: FaultPlan,
    /// A packet held back by a reorder fault, per destination: it goes after the next one.
    held: Arc<Mutex<HashMap<WorkerId, Packet>>>,
    /// Whether the plan has partitions (each packet is checked against them).
    partitions: bool,
}

impl<T: Transport> FaultyTransport<T> {
    /// Wrap `inner`.
    pub fn new(inner: T, plan: FaultPlan) -> Self {
        FaultyTransport {
            inner: Arc::new(inner),
            partitions: plan.has_partitions(),
            plan,
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

fn step_of(payload: &Payload) -> Option<u64> {
    match payload {
        Payload::ExpertForward { step, .. }
        | Payload::ExpertBackward { step, .. }
        | Payload::DenseGrads { step, .. }
        | Payload::Gather { step, .. }
        | Payload::Params { step, .. } => Some(step.step),
        _ => None,
    }
}

fn take_held(held: &Mutex<HashMap<WorkerId, Packet>>, to: WorkerId) -> Option<Packet> {
    held.lock().unwrap_or_else(|e| e.into_inner()).remove(&to)
}

/// The packet held for `to`, if it is still packet `id` (a reorder's timer releases its own
/// packet only, not a newer one held since).
fn take_held_if(held: &Mutex<HashMap<WorkerId, Packet>>, to: WorkerId, id: u64) -> Option<Packet> {
    let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
    if held.get(&to).is_some_and(|p| p.id == id) {
        held.remove(&to)
    } else {
        None
    }
}

/// Send a packet that was held back or delayed, unless a partition between its two workers began
/// meanwhile: it is lost as a packet sent then would be.
fn send_late<T: Transport>(inner: &T, plan: &FaultPlan, partitions: bool, packet: Packet) -> Result<()> {
    // (No step: a late packet only meets a partition already on, it does not start one.)
    if partitions && plan.partitioned(inner.id(), packet.to, None) {
        return Ok(());
    }
    inner.send(packet)
}

impl<T: Transport> Transport for FaultyTransport<T> {
    fn id(&self) -> WorkerId {
        self.inner.id()
    }

    fn workers(&self) -> usize {
        self.inner.workers()
    }

    fn send(&self, packet: Packet) -> Result<()> {
        let to = packet.to;
        let from = self.inner.id();
        let step = step_of(&packet.payload);
        if self.partitions && self.plan.partitioned(from, to, step) {
            return Ok(());
        }
        let fault = step.and_then(|step| self.plan.fire(&Target::Link { from, to }, step, Moment::Any));
        let result = match fault {
            Some(FaultKind::Drop) => Ok(()),
            // Between worker processes real bytes travel: the transport flips a byte of the
            // request's frame after its checksum, and the receiver refuses it and evicts this
            // worker. In process no bytes travel: the damaged request is what the receiver's
            // checks refuse, and a peer that sends what cannot be decoded is evicted.
            Some(FaultKind::Corrupt) => match self.inner.send_damaged(packet) {
                Some(sent) => sent,
                None => Err(Error::protocol(
                    format!("worker {from}"),
                    format!(
                        "its request to worker {to} (step {}) arrived with damaged bytes and could not be decoded \
                     (an injected link fault); in-process workers are not elastic, so the run stops",
                        step.unwrap_or_default()
                    ),
                )),
            },
            Some(FaultKind::Duplicate) => self.inner.send(packet.clone()).and_then(|()| self.inner.send(packet)),
            Some(FaultKind::Delay(delay)) => match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    let (inner, plan, partitions) = (self.inner.clone(), self.plan.clone(), self.partitions);
                    handle.spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = send_late(&*inner, &plan, partitions, packet);
                    });
                    Ok(())
                }
                Err(_) => {
                    std::thread::sleep(delay);
                    send_late(&*self.inner, &self.plan, self.partitions, packet)
                }
            },
            Some(FaultKind::Reorder) => {
                // Held back: the next packet to the same worker overtakes it (or it goes after a
                // short wait if none comes).
                let id = packet.id;
                let previous = self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(to, packet);
                if let Some(p) = previous {
                    send_late(&*self.inner, &self.plan, self.partitions, p)?;
                }
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let (inner, held) = (self.inner.clone(), self.held.clone());
                    let (plan, partitions) = (self.plan.clone(), self.partitions);
                    handle.spawn(async move {
                        tokio::time::sleep(REORDER_WAIT).await;
                        if let Some(p) = take_held_if(&held, to, id) {
                            let _ = send_late(&*inner, &plan, partitions, p);
                        }
                    });
                } else if let Some(p) = take_held(&self.held, to) {
                    send_late(&*self.inner, &self.plan, self.partitions, p)?;
                }
                return Ok(());
            }
            // Actor and disk faults are not the transport's.
            Some(_) | None => self.inner.send(packet),
        };
        // A packet held back for reordering goes right after this one.
        if let Some(p) = take_held(&self.held, to) {
            send_late(&*self.inner, &self.plan, self.partitions, p)?;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::FaultKind;
    use crate::net::{local, StepId};

    fn request(id: u64, step: u64) -> Packet {
        Packet {
            from: 0,
            to: 1,
            id,
            payload: Payload::Gather {
                step: StepId::first(step),
                tensors: vec![],
            },
        }
    }

    fn reply(id: u64) -> Packet {
        Packet {
            from: 0,
            to: 1,
            id,
            payload: Payload::Ack,
        }
    }

    /// Sends `packets` from worker 0 to worker 1 under `kind` (on the first two requests of step
    /// 1) and returns the ids worker 1 receives within 200 ms, in order.
    async fn deliver(kind: FaultKind, packets: Vec<Packet>) -> Vec<u64> {
        let plan = FaultPlan::none();
        plan.push(super::super::Fault {
            target: Target::Link { from: 0, to: 1 },
            step: 1,
            moment: Moment::Any,
            kind,
            times: 2,
        });
        let mut net = local::network(2);
        let (_, mut inbox) = net.pop().expect("endpoint 1");
        let (t0, _inbox0) = net.pop().expect("endpoint 0");
        let t0 = FaultyTransport::new(t0, plan.clone());
        for p in packets {
            t0.send(p).expect("send");
        }
        let mut got = Vec::new();
        while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), inbox.recv()).await {
            got.push(p.id);
        }
        assert_eq!(plan.firings().len(), 2, "{kind:?} fired on two requests");
        got
    }

    #[tokio::test]
    async fn a_partition_loses_everything_both_ways_for_its_duration() {
        let plan = FaultPlan::none();
        plan.push(super::super::Fault {
            target: Target::Link { from: 0, to: 1 },
            step: 1,
            moment: Moment::Any,
            kind: FaultKind::Partition(Duration::from_millis(100)),
            times: 1,
        });
        let mut net = local::network(2);
        let (t1, mut inbox1) = net.pop().expect("endpoint 1");
        let (t0, mut inbox0) = net.pop().expect("endpoint 0");
        let (t0, t1) = (
            FaultyTransport::new(t0, plan.clone()),
            FaultyTransport::new(t1, plan.clone()),
        );
        let back = |id| Packet {
            from: 1,
            to: 0,
            ..reply(id)
        };
        // Before it starts (a request of step 0, a reply), everything goes through.
        t0.send(request(1, 0)).expect("send");
        t1.send(back(2)).expect("send");
        // The first request of step 1 starts it: lost, and so is everything else, both ways.
        t0.send(request(3, 1)).expect("send");
        t1.send(back(4)).expect("send");
        t0.send(request(5, 0)).expect("send");
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Over: through again.
        t0.send(request(6, 1)).expect("send");
        t1.send(back(7)).expect("send");
        let drain = |inbox: &mut crate::net::Inbox| {
            let mut got = Vec::new();
            while let Ok(p) = inbox.try_recv() {
                got.push(p.id);
            }
            got
        };
        assert_eq!(drain(&mut inbox1), vec![1, 6]);
        assert_eq!(drain(&mut inbox0), vec![2, 7]);
        assert_eq!(plan.firings().len(), 1, "it starts once");
        assert_eq!(plan.firings()[0].step, 1);
    }

    /// A request delayed, or held back for reordering, that would go while a partition is on is
    /// lost with everything else between the two (it used to cross the partition); a reorder's
    /// timer releases only its own packet.
    #[tokio::test]
    async fn late_packets_do_not_cross_a_partition() {
        let plan = FaultPlan::none();
        let fault = |step, kind| super::super::Fault {
            target: Target::Link { from: 0, to: 1 },
            step,
            moment: Moment::Any,
            kind,
            times: 1,
        };
        plan.push(fault(1, FaultKind::Delay(Duration::from_millis(50))));
        plan.push(fault(2, FaultKind::Reorder));
        plan.push(fault(3, FaultKind::Partition(Duration::from_millis(300))));
        let mut net = local::network(2);
        let (_, mut inbox1) = net.pop().expect("endpoint 1");
        let (t0, _inbox0) = net.pop().expect("endpoint 0");
        let t0 = FaultyTransport::new(t0, plan.clone());
        t0.send(request(1, 1)).expect("delayed by 50 ms");
        t0.send(request(2, 2)).expect("held for up to 20 ms");
        t0.send(request(3, 3)).expect("starts the partition, lost");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut got = Vec::new();
        while let Ok(p) = inbox1.try_recv() {
            got.push(p.id);
        }
        // Request 2's reorder timer released it 20 ms later, request 1's delay after 50 ms: both
        // inside the partition, which request 3 began.
        assert_eq!(got, Vec::<u64>::new(), "nothing crosses the partition");
        assert_eq!(plan.firings().len(), 3);
    }

    #[tokio::test]
    async fn a_corrupted_request_is_refused_naming_the_link() {
        let plan = FaultPlan::none().with(Target::Link { from: 0, to: 1 }, 1, Moment::Any, FaultKind::Corrupt);
        let mut net = local::network(2);
        let (_, mut inbox1) = net.pop().expect("endpoint 1");
        let (t0, _inbox0) = net.pop().expect("endpoint 0");
        let t0 = FaultyTransport::new(t0, plan);
        t0.send(request(1, 0)).expect("another step");
        let e = t0.send(request(2, 1)).expect_err("corrupted").to_string();
        assert!(
            e.contains("worker 0") && e.contains("worker 1") && e.contains("could not be decoded"),
            "{e}"
        );
        t0.send(request(3, 1)).expect("spent");
        let mut got = Vec::new();
        while let Ok(p) = inbox1.try_recv() {
            got.push(p.id);
        }
        assert_eq!(got, vec![1, 3]);
    }

    /// A transport that carries bytes: it records what it was asked to send damaged.
    struct Bytes(Mutex<Vec<(u64, bool)>>);

    impl Transport for Bytes {
        fn id(&self) -> WorkerId {
            0
        }
        fn workers(&self) -> usize {
            2
        }
        fn send(&self, packet: Packet) -> Result<()> {
            self.0.lock().expect("lock").push((packet.id, false));
            Ok(())
        }
        fn send_damaged(&self, packet: Packet) -> Option<Result<()>> {
            self.0.lock().expect("lock").push((packet.id, true));
            Some(Ok(()))
        }
    }

    #[test]
    fn where_bytes_travel_a_corrupted_request_is_sent_damaged() {
        let plan = FaultPlan::none().with(Target::Link { from: 0, to: 1 }, 1, Moment::Any, FaultKind::Corrupt);
        let t = FaultyTransport::new(Bytes(Mutex::new(Vec::new())), plan.clone());
        for (id, step) in [(1, 0), (2, 1), (3, 1)] {
            t.send(request(id, step)).expect("sent");
        }
        let sent = t.inner.0.lock().expect("lock").clone();
        assert_eq!(
            sent,
            vec![(1, false), (2, true), (3, false)],
            "only the first request of step 1"
        );
        assert_eq!(plan.firings().len(), 1);
    }

    #[tokio::test]
    async fn each_network_fault_does_what_it_says() {
        // Requests 1 and 3 are of step 1; request 2 of step 0 and the replies are never faulted.
        let packets = || vec![request(1, 1), request(2, 0), reply(9), request(3, 1), reply(10)];
        assert_eq!(deliver(FaultKind::Drop, packets()).await, vec![2, 9, 10]);
        assert_eq!(
            deliver(FaultKind::Duplicate, packets()).await,
            vec![1, 1, 2, 9, 3, 3, 10]
        );
        assert_eq!(deliver(FaultKind::Reorder, packets()).await, vec![2, 1, 9, 10, 3]);
        assert_eq!(
            deliver(FaultKind::Delay(Duration::from_millis(30)), packets()).await,
            vec![2, 9, 10, 1, 3]
        );
    }
}
