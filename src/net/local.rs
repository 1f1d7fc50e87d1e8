//! The in-process transport: one unbounded channel per worker. Buffers move, they are not copied.

use super::{Inbox, Packet, Transport, WorkerId};
use crate::error::{Error, Result};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// One worker's endpoint of an in-process network.
#[derive(Clone, Debug)]
pub struct LocalTransport {
    id: WorkerId,
    peers: Vec<UnboundedSender<Packet>>,
}

/// Build an in-process network of `workers` endpoints: each endpoint with its inbox.
pub fn network(workers: usize) -> Vec<(LocalTransport, Inbox)> {
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..workers).map(|_| unbounded_channel()).unzip();
    inboxes
        .into_iter()
        .enumerate()
        .map(|(id, inbox)| {
            (
                LocalTransport {
                    id,
                    peers: senders.clone(),
                },
                inbox,
            )
        })
        .collect()
}

impl Transport for LocalTransport {
    fn id(&self) -> WorkerId {
        self.id
    }

    fn workers(&self) -> usize {
        self.peers.len()
    }

    fn send(&self, packet: Packet) -> Result<()> {
        // As over QUIC: a packet says who sent it, and a wrong `from` is a bug of the sender's
        // that in-process runs must not hide.
        if packet.from != self.id {
            return Err(Error::runtime(format!(
                "worker {} cannot send a packet from worker {}",
                self.id, packet.from
            )));
        }
        let to = packet.to;
        let peer = self
            .peers
            .get(to)
            .ok_or_else(|| Error::runtime(format!("worker {to} does not exist ({} workers)", self.peers.len())))?;
        peer.send(packet)
            .map_err(|_| Error::runtime(format!("worker {to} has shut down (its inbox is closed)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Payload;

    #[test]
    fn a_packet_from_another_worker_is_refused() {
        let net = network(2);
        let err = net[0]
            .0
            .send(Packet {
                from: 1,
                to: 1,
                id: 0,
                payload: Payload::Ack,
            })
            .expect_err("a forged sender")
            .to_string();
        assert!(err.contains("worker 0 cannot send a packet from worker 1"), "{err}");
    }

    #[tokio::test]
    async fn packets_arrive_in_order() {
        let mut net = network(2);
        let (_, mut inbox1) = net.pop().expect("endpoint 1");
        let (t0, _inbox0) = net.pop().expect("endpoint 0");
        for id in 0..3 {
            t0.send(Packet {
                from: 0,
                to: 1,
                id,
                payload: Payload::Ack,
            })
            .expect("send");
        }
        for id in 0..3 {
            assert_eq!(inbox1.recv().await.expect("packet").id, id);
        }
        let err = t0
            .send(Packet {
                from: 0,
                to: 5,
                id: 9,
                payload: Payload::Ack,
            })
            .expect_err("no such worker");
        assert!(err.to_string().contains("worker 5"), "{err}");
    }
}
