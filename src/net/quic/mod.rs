//! The QUIC transport between worker processes.
//!
//! # Topology
//!
//! Every worker process runs one [`DataPlane`] on one UDP endpoint, for the life of the process.
//! Membership changes in epochs: at each epoch every worker connects to every other member, so
//! there is one connection per *ordered* pair, and worker `w` sends to `v` only over the connection
//! `w` opened to `v`. On it `w` opens one long-lived unidirectional stream whose first frame is a
//! hello (the job's admission token, the epoch, `w`'s id) and whose further frames are `w`'s
//! packets to `v`, length-prefixed, in order: per-pair ordering is the stream's ordering, and no
//! stream is opened per message. A peer sees a stream only once its opener wrote to it, which is
//! why the hello goes first. `v` admits the connection only if the token matches (else it closes it
//! at once with the reason "wrong token") and then checks that every packet on it decodes for the
//! epoch, comes from `w` and is addressed to `v`. Every packet frame ends with the CRC-32 of its
//! bytes, checked before it is decoded ([`seal`], [`open`]): a flipped byte of tensor data would
//! decode as a valid float, so only the checksum can refuse it (TLS protects the QUIC path on the
//! wire; the checksum covers both paths end to end, and the chaos runs' corrupt link faults).
//!
//! Between worker processes of one machine the same frames travel over Unix stream sockets
//! instead, when both planes enable it ([`DataPlane::enable_same_host`]; see `local` for the
//! names, the checks and how a connection says why it ends).
//!
//! # Trust
//!
//! TLS 1.3 (ring only). The job makes one self-signed certificate ([`JobIdentity`]) that every
//! worker serves; clients pin its SHA-256, so no CA is involved. The certificate proves the server
//! is part of the job; the token in the hello proves the client is. Both travel to the workers in
//! a [`JoinTicket`] file readable only by its owner.
//!
//! # Failure detection
//!
//! Connections have an idle timeout of 1.5 s and send keep-alives every 300 ms, so a killed or
//! partitioned peer surfaces as a timed-out connection about 1.5 s after it went silent, and a peer
//! that closes (or refuses) a connection surfaces at once with its reason. Either becomes a
//! [`PeerEvent::Lost`]; a peer that breaks the protocol is closed and reported as
//! [`PeerEvent::Evicted`]. Events of an epoch stop when the next epoch starts.

mod config;
mod frame;
mod identity;
mod local;
mod plane;
mod reader;
#[cfg(test)]
mod tests;

pub use config::{
    authenticated, client_config, data_plane_endpoint, endpoint, server_config, transport_config, ALPN,
    CONNECTION_WINDOW, IDLE_TIMEOUT, KEEP_ALIVE, PRE_AUTH_WINDOW, STREAM_WINDOW,
};
pub use frame::{damage, open, read_frame, seal, write_chunks, write_frame, write_frame_owned, CHECKSUM_BYTES};
pub use identity::{
    constant_time_eq, sha256_hex, JobIdentity, JoinTicket, IDENTITY_HEADER, SERVER_NAME, TICKET_HEADER,
};
pub use plane::{DataPlane, LinkPath, PacketCodec, PeerEvent, QuicTransport, MAX_PACKET_FRAME, MAX_TOKEN};
