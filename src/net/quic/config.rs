//! QUIC and TLS configuration: TLS 1.3 only, ring only, the job certificate pinned by fingerprint,
//! and transport settings that detect a dead peer in 1.5 s.

use super::identity::{sha256_hex, JobIdentity};
use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The ALPN protocol both sides must agree on: a stray QUIC client of another protocol is refused
/// in the handshake.
pub const ALPN: &[u8] = b"semoe/1";

/// A connection that carries no packet for this long is dead (a killed or partitioned peer).
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Keep-alives keep an idle but live connection from reaching [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE: Duration = Duration::from_millis(300);

/// Flow-control window of one stream: a frame of tens of MiB flows without waiting for the reader
/// to grant more credit.
pub const STREAM_WINDOW: u32 = 64 << 20;

/// Flow-control window of one connection (all its streams).
pub const CONNECTION_WINDOW: u32 = 128 << 20;

/// Flow-control window of a connection this side accepted, until its peer has shown the job's
/// token ([`authenticated`]): a hello is small (the data plane's at most `MAX_HELLO` bytes, the
/// coordinator's join hello at most 64 KiB), and a stranger who opens connections
/// and sends without one must not make this process buffer [`CONNECTION_WINDOW`] for each.
pub const PRE_AUTH_WINDOW: u32 = 1 << 20;

/// ring's provider, built explicitly (no process-wide default is installed or needed). rustls
/// 0.23.48 deprecates it for lacking post-quantum key exchange; the job uses ring only (no aws-lc
/// in the build), and every peer is pinned, so classical X25519 is what both ends offer.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The transport settings of every connection: idle timeout [`IDLE_TIMEOUT`] with keep-alives every
/// [`KEEP_ALIVE`] (a peer that dies shows as `ConnectionError::TimedOut` about 1.5 s later, a peer
/// that closes as `ApplicationClosed` with its reason at once), and windows big enough for frames
/// of tens of MiB.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // No DATAGRAM frames: the protocol never reads them, and advertised they let any peer, before
    // its token is checked, park a receive buffer (1.25 MB by default) in each connection.
    t.datagram_receive_buffer_size(None);
    // 1500 ms is far below the VarInt limit of an idle timeout, so the conversion cannot fail.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    t
}

/// The server side: serve `identity`'s certificate over TLS 1.3 with [`ALPN`].
pub fn server_config(identity: &JobIdentity) -> Result<quinn::ServerConfig> {
    server_config_with(identity, false)
}

/// [`server_config`]; with `peers_hold_the_job`, a client must present the job certificate itself
/// (the data plane: every peer was admitted and holds it), so that a stranger is refused in the
/// TLS handshake, before it can hold one of the places that wait for a hello.
fn server_config_with(identity: &JobIdentity, peers_hold_the_job: bool) -> Result<quinn::ServerConfig> {
    let cert = CertificateDer::from(identity.cert_der.clone());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::runtime(format!("TLS server configuration: {e}")))?;
    let builder = if peers_hold_the_job {
        builder.with_client_cert_verifier(Arc::new(PinnedCert {
            pin: identity.fingerprint(),
            provider,
        }))
    } else {
        builder.with_no_client_auth()
    };
    let mut tls = builder
        .with_single_cert(vec![cert], key)
        .map_err(|e| Error::runtime(format!("TLS server configuration (the job certificate): {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::runtime(format!("QUIC server configuration: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = transport_config();
    transport.receive_window(quinn::VarInt::from_u32(PRE_AUTH_WINDOW));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// An accepted connection's peer has shown the job's token: open its flow-control window to
/// [`CONNECTION_WINDOW`] (it starts at [`PRE_AUTH_WINDOW`]).
pub fn authenticated(conn: &quinn::Connection) {
    conn.set_receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW));
}

/// The client side: TLS 1.3 with [`ALPN`], accepting exactly the certificate whose SHA-256 (hex) is
/// `pinned_sha256` and nothing else.
pub fn client_config(pinned_sha256: &str) -> Result<quinn::ClientConfig> {
    client_config_with(pinned_sha256, None)
}

/// [`client_config`], presenting `identity`'s certificate when the server asks for one (a data
/// plane's peer: see [`data_plane_endpoint`]).
fn client_config_with(pinned_sha256: &str, identity: Option<&JobIdentity>) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = PinnedCert {
        pin: pinned_sha256.trim().to_ascii_lowercase(),
        provider: provider.clone(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::runtime(format!("TLS client configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut tls = match identity {
        Some(identity) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(identity.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone())),
            )
            .map_err(|e| Error::runtime(format!("TLS client configuration (the job certificate): {e}")))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::runtime(format!("QUIC client configuration: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A UDP endpoint bound to `bind` that serves `identity` and connects (by default) to servers whose
/// certificate is `pinned` (every worker of a job serves the same job certificate).
pub fn endpoint(bind: SocketAddr, identity: &JobIdentity, pinned: &str) -> Result<quinn::Endpoint> {
    let mut endpoint = quinn::Endpoint::server(server_config(identity)?, bind)
        .map_err(|e| Error::runtime(format!("cannot bind the QUIC endpoint to {bind}: {e}")))?;
    endpoint.set_default_client_config(client_config(pinned)?);
    Ok(endpoint)
}

/// A data plane's endpoint on `socket`, bound beforehand (a worker reports its data port before it
/// holds the job identity to serve with): every connection's two ends are peers of the job, each
/// presenting the job certificate in the TLS handshake (a stranger is refused there, before
/// the hello and its token).
pub fn data_plane_endpoint(socket: std::net::UdpSocket, identity: &JobIdentity) -> Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| Error::runtime("QUIC needs a tokio runtime"))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config_with(identity, true)?),
        socket,
        runtime,
    )
    .map_err(|e| Error::runtime(format!("cannot open the QUIC endpoint: {e}")))?;
    endpoint.set_default_client_config(client_config_with(&identity.fingerprint(), Some(identity))?);
    Ok(endpoint)
}

/// Accepts exactly the certificate whose SHA-256 is the pin; the handshake signature is still
/// verified against it, so the server must hold the job's private key.
#[derive(Debug)]
struct PinnedCert {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCert {
    /// The handshake's signature, checked against the certificate presented (so its holder has
    /// the job's private key), for both directions.
    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
}

/// The configurations allow TLS 1.3 only.
fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not allowed".to_string())
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = sha256_hex(end_entity.as_ref());
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate did not match the job's pinned certificate (SHA-256 {} \
                 expected, {got} presented)",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration allows TLS 1.3 only.
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl rustls::server::danger::ClientCertVerifier for PinnedCert {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if sha256_hex(end_entity.as_ref()) == self.pin {
            Ok(rustls::server::danger::ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the peer's certificate is not the job's: not a member of this job".to_string(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
