//! NBD over TLS (NBD_OPT_STARTTLS): libnbd's and qemu's clients against a
//! server that requires it, plain clients refused, a raw rustls client for
//! the protocol corners, and a server without TLS refusing STARTTLS.

mod common;
#[path = "common/wire.rs"]
mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keel_nbd_server::proto::{self, cmd, opt, rep};
use keel_nbd_server::{PoolExports, ServerConfig, serve};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsConnector, rustls};
use wire::*;

/// A CA and certificates signed by it, as GnuTLS-style files in `dir`
/// (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
/// client-key.pem) -- the layout qemu's `tls-creds-x509,dir=` and libnbd's
/// `tls-certificates=` read.
struct Pki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
}

fn make_pki(dir: &Path, ca_name: &str) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |cn: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        (p.signed_by(&key, &issuer).unwrap(), key)
    };
    let (server, server_key) =
        leaf("localhost", vec!["localhost".into(), "127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth);
    let (client, client_key) = leaf("keel-test-client", vec![], ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("client-cert.pem"), client.pem()).unwrap();
    std::fs::write(dir.join("client-key.pem"), client_key.serialize_pem()).unwrap();
    Pki { dir: dir.to_path_buf(), ca: ca_cert.der().clone() }
}

fn tls_config(pki: &Pki, require: bool) -> ServerConfig {
    let acceptor =
        keel_nbd_server::tls::acceptor_from_pem(&pki.dir.join("server-cert.pem"), &pki.dir.join("server-key.pem"))
            .unwrap();
    ServerConfig { tls: Some(acceptor), require_tls: require, ..ServerConfig::default() }
}

/// A server requiring TLS with one 32 MiB volume "vol", and the directory
/// holding its certificates (kept as long as the returned guard lives).
async fn tls_harness() -> (Harness, Pki, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(&certs.path().join("pki"), "Keel test CA");
    let h = Harness::with_config(256 * MIB, tls_config(&pki, true)).await;
    h.pool.create_volume("vol", 32 * MIB).await.unwrap();
    (h, pki, certs)
}

fn connector(ca: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// NBD_OPT_STARTTLS on a negotiating plain connection, then the TLS
/// handshake; negotiation goes on inside TLS.
async fn upgrade(mut w: Wire<TcpStream>, ca: &CertificateDer<'static>) -> Wire<TlsStream<TcpStream>> {
    let r = w.option(opt::STARTTLS, &[]).await;
    assert_eq!((r.len(), r[0].kind), (1, rep::ACK), "STARTTLS: {r:?}");
    let name = ServerName::try_from("localhost").unwrap();
    let tls = within("TLS handshake", connector(ca).connect(name, w.s)).await.expect("TLS handshake");
    Wire::new(tls)
}

/// Run a client program with a time limit (a hang fails the test).
async fn run_limited(prog: &str, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(30), run(prog, args))
        .await
        .unwrap_or_else(|_| panic!("{prog} {args:?} hung"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_over_tls_sees_the_volume() {
    let (h, pki, _certs) = tls_harness().await;
    let port = h.addr.port();
    let dir = pki.dir.to_str().unwrap();
    let uri = format!("nbds://localhost:{port}/vol?tls-certificates={dir}");
    let out = run_limited("nbdinfo", &[&uri]).await;
    let t = text(&out);
    assert!(t.contains(&(32 * MIB).to_string()), "{t}");
    assert!(t.to_lowercase().contains("tls: true") || t.contains("TLS"), "{t}");
    let out = run_limited("nbdinfo", &["--list", &format!("nbds://localhost:{port}?tls-certificates={dir}")]).await;
    assert!(text(&out).contains("vol"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_over_tls_reads_and_writes() {
    let (h, pki, _certs) = tls_harness().await;
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", pki.dir.display());
    let image = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={},export=vol,tls-creds=tls0",
        h.addr.port()
    );
    let out = run_limited("qemu-img", &["info", "--object", &object, "--image-opts", &image]).await;
    assert!(text(&out).contains("32 MiB"), "{}", text(&out));
    let out = run_limited(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &image,
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -P 0xa5 -f 8M 1M",
            "-c",
            "write -z 12M 1M",
            "-c",
            "flush",
            // Reads of at most 1 MiB: see tls_read_replies_are_flushed_whole
            // for what bigger ones can run into.
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0x5a 3M 1M",
            "-c",
            "read -P 0xa5 8M 1M",
            "-c",
            "read -P 0 12M 1M",
            "-c",
            "read -P 0 20M 1M",
        ],
    )
    .await;
    let t = text(&out);
    assert!(!t.contains("fail") && !t.contains("error"), "{t}");
    assert_eq!(t.matches("read ").count(), 5, "{t}");
    // The data went through to the store.
    let mut b = vec![0u8; 4096];
    h.pool.volume("vol").unwrap().read(8 * MIB, &mut b).await.unwrap();
    assert!(b.iter().all(|&x| x == 0xa5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_clients_are_refused_when_tls_is_required() {
    let (h, pki, _certs) = tls_harness().await;
    let out = within("nbdinfo", run_failing("nbdinfo", &[&h.url("vol")])).await;
    assert!(text(&out).contains("TLS"), "{}", text(&out));
    let out = within("qemu-img", run_failing("qemu-img", &["info", &h.url("vol")])).await;
    assert!(text(&out).to_lowercase().contains("tls"), "{}", text(&out));

    // Raw: NBD_OPT_GO first is refused with ERR_TLS_REQD, and so is every
    // other option but STARTTLS and ABORT.
    let mut w = Wire::start(h.addr).await;
    let e = w.go("vol", &[]).await.unwrap_err();
    assert_eq!((e.option, e.kind), (opt::GO, rep::ERR_TLS_REQD), "{e:?}");
    assert!(e.text().contains("TLS"), "{}", e.text());
    for o in [opt::INFO, opt::LIST, opt::STRUCTURED_REPLY, opt::LIST_META_CONTEXT, 99] {
        let data = if o == opt::INFO { vec![0, 0, 0, 3, b'v', b'o', b'l', 0, 0] } else { Vec::new() };
        let r = w.option(o, &data).await;
        assert_eq!((r.len(), r[0].kind), (1, rep::ERR_TLS_REQD), "option {o}: {r:?}");
    }
    assert_eq!(w.option(opt::ABORT, &[]).await[0].kind, rep::ACK);
    assert!(w.closed().await.is_empty());
    // NBD_OPT_EXPORT_NAME without TLS cannot be answered: closed.
    let mut w = Wire::start(h.addr).await;
    w.send_option(opt::EXPORT_NAME, b"vol").await;
    assert!(w.closed().await.is_empty());
    // After refusals, TLS still works on the same connection.
    let mut w = Wire::start(h.addr).await;
    assert_eq!(w.go("vol", &[]).await.unwrap_err().kind, rep::ERR_TLS_REQD);
    let mut t = upgrade(w, &pki.ca).await;
    t.go("vol", &[]).await.unwrap();
    t.write_ok(0, &pattern(1, 4096), 0).await;
    t.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_client_negotiates_and_transmits_inside_tls() {
    let (h, pki, _certs) = tls_harness().await;
    let mut t = upgrade(Wire::start(h.addr).await, &pki.ca).await;
    // A second STARTTLS is invalid; nothing is TLS_REQD any more.
    let r = t.option(opt::STARTTLS, &[]).await;
    assert_eq!(r[0].kind, rep::ERR_INVALID, "{r:?}");
    assert_eq!(t.list().await.unwrap(), ["vol"]);
    assert_eq!(t.option(99, &[]).await[0].kind, rep::ERR_UNSUP);
    t.structured_reply().await;
    let e = t.go("vol", &[proto::info::BLOCK_SIZE]).await.unwrap();
    assert_eq!(e.size, 32 * MIB);
    let d = pattern(2, 1 << 20);
    t.write_ok(MIB, &d, proto::cflag::FUA).await;
    assert!(t.read_ok(MIB, 1 << 20).await == d);
    assert_eq!(t.read(32 * MIB, 4096).await.error, proto::errno::EINVAL);
    assert_eq!(t.request(99, 0, 0, 512, &[]).await.error, proto::errno::EINVAL);
    assert_eq!(t.flush().await.error, 0);
    t.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tls_handshake_closes_only_that_connection() {
    let (h, pki, _certs) = tls_harness().await;
    // Garbage where the ClientHello should be.
    let mut w = Wire::start(h.addr).await;
    assert_eq!(w.option(opt::STARTTLS, &[]).await[0].kind, rep::ACK);
    let _ = w.try_send(&[0x42; 300]).await;
    let _ = w.closed().await;
    // A client that trusts another CA gives up on the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let stranger = make_pki(other.path(), "Some other CA");
    let mut w = Wire::start(h.addr).await;
    assert_eq!(w.option(opt::STARTTLS, &[]).await[0].kind, rep::ACK);
    let name = ServerName::try_from("localhost").unwrap();
    let r = within("TLS handshake", connector(&stranger.ca).connect(name, w.s)).await;
    assert!(r.is_err(), "a certificate from an unknown CA was accepted");
    // A client that STARTTLSes and then vanishes.
    let mut w = Wire::start(h.addr).await;
    assert_eq!(w.option(opt::STARTTLS, &[]).await[0].kind, rep::ACK);
    drop(w);
    // The server still serves TLS clients.
    let mut t = upgrade(Wire::start(h.addr).await, &pki.ca).await;
    t.go("vol", &[]).await.unwrap();
    assert_eq!(t.read_ok(0, 4096).await.len(), 4096);
    t.disconnect().await;
}

/// Read exactly `buf.len()` bytes unless the stream stalls for `stall`;
/// returns how many arrived.
async fn read_until_stall<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut [u8], stall: Duration) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match tokio::time::timeout(stall, tokio::io::AsyncReadExt::read(s, &mut buf[got..])).await {
            Ok(Ok(n)) if n > 0 => got += n,
            Ok(r) => panic!("the server closed the connection ({r:?}) after {got} bytes"),
            Err(_) => break,
        }
    }
    got
}

/// A read reply over TLS must reach the client whole even when the socket
/// is full as the server finishes writing it: rustls keeps the last TLS
/// records in its own buffer until the stream is flushed or written again,
/// so a reply written with `write_all` and no `flush` can stay stuck in the
/// server while the client waits for it. The server here has a small
/// socket send buffer (16 KiB, as a busy host or a slow link gives) so the
/// socket is usually full at the end of a reply; with default buffers the
/// same stall shows with multi-MiB reads, only less often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_read_replies_are_flushed_whole() {
    let (h, pki, _certs) = tls_harness().await;
    // A second server over the same pool, on a listener whose accepted
    // sockets get a small send buffer.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(16 * 1024).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    let exports = Arc::new(PoolExports::new(h.pool.clone()));
    let server = tokio::spawn(serve(listener, exports, Arc::new(tls_config(&pki, true))));

    let mut t = upgrade(Wire::start(addr).await, &pki.ca).await;
    t.go("vol", &[]).await.unwrap();
    const LEN: usize = 256 * 1024;
    let d = pattern(3, LEN);
    t.write_ok(0, &d, 0).await;
    for round in 0..20u64 {
        let cookie = 1000 + round;
        t.send(&Wire::<TcpStream>::request_header(0, cmd::READ, cookie, 0, LEN as u32)).await;
        // Let the server fill the socket before draining it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut buf = vec![0u8; 16 + LEN];
        let got = read_until_stall(&mut t.s, &mut buf, Duration::from_secs(2)).await;
        if got < buf.len() {
            // Stalled. Any later write by the server pushes out what it
            // held back: ask for a flush and see whether the rest comes.
            t.send(&Wire::<TcpStream>::request_header(0, cmd::FLUSH, 1, 0, 0)).await;
            let more = read_until_stall(&mut t.s, &mut buf[got..], Duration::from_secs(5)).await;
            panic!(
                "round {round}: a {LEN}-byte read reply over TLS stopped {} bytes short of its end; {}",
                buf.len() - got,
                if got + more == buf.len() {
                    "the missing bytes arrived only when the next request (NBD_CMD_FLUSH) made the server write \
                     again: the server does not flush its TLS stream after writing a reply"
                } else {
                    "they did not arrive even after another request"
                }
            );
        }
        assert_eq!(u32::from_be_bytes(buf[..4].try_into().unwrap()), proto::SIMPLE_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(buf[4..8].try_into().unwrap()), 0, "read error");
        assert_eq!(u64::from_be_bytes(buf[8..16].try_into().unwrap()), cookie);
        assert!(buf[16..] == d[..], "round {round}: wrong data");
    }
    t.disconnect().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_on_a_server_without_tls_is_refused_and_the_connection_goes_on() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("vol", 16 * MIB).await.unwrap();
    let mut w = Wire::start(h.addr).await;
    let r = w.option(opt::STARTTLS, &[]).await;
    assert_eq!((r.len(), r[0].option, r[0].kind), (1, opt::STARTTLS, rep::ERR_POLICY), "{r:?}");
    // Still plain text, still negotiating.
    assert_eq!(w.option(opt::STARTTLS, b"junk").await[0].kind, rep::ERR_INVALID);
    assert_eq!(w.list().await.unwrap(), ["vol"]);
    w.structured_reply().await;
    w.go("vol", &[]).await.unwrap();
    let d = pattern(4, 65536);
    w.write_ok(0, &d, 0).await;
    assert!(w.read_ok(0, 65536).await == d);
    w.disconnect().await;
    // nbds:// against it fails (the client insists on TLS) ...
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "Keel test CA");
    let uri = format!("nbds://localhost:{}/vol?tls-certificates={}", h.addr.port(), pki.dir.display());
    let out = within("nbdinfo", tokio::process::Command::new("nbdinfo").arg(&uri).env("LIBNBD_DEBUG", "1").output())
        .await
        .unwrap();
    assert!(!out.status.success(), "nbds:// to a server without TLS succeeded: {}", text(&out));
    // libnbd's own error is "connection is closed"; its debug log shows
    // the server's refusal.
    assert!(text(&out).contains("no TLS credentials configured"), "{}", text(&out));
    // ... and plain clients are served.
    run_limited("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &h.url("vol")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_offered_but_not_required_serves_both() {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(certs.path(), "Keel test CA");
    let h = Harness::with_config(256 * MIB, tls_config(&pki, false)).await;
    h.pool.create_volume("vol", 16 * MIB).await.unwrap();
    // Plain: no TLS_REQD anywhere.
    let (mut w, _) = Wire::open(h.addr, "vol", false).await;
    w.write_ok(0, &pattern(5, 4096), 0).await;
    w.disconnect().await;
    // TLS on request.
    let mut t = upgrade(Wire::start(h.addr).await, &pki.ca).await;
    t.go("vol", &[]).await.unwrap();
    assert!(t.read_ok(0, 4096).await == pattern(5, 4096));
    t.disconnect().await;
    let uri = format!("nbds://localhost:{}/vol?tls-certificates={}", h.addr.port(), pki.dir.display());
    run_limited("nbdinfo", &[&uri]).await;
    run_limited("nbdinfo", &[&h.url("vol")]).await;
}

/// proto.md, NBD_OPT_STARTTLS: "When this command succeeds, the server
/// MUST NOT preserve any negotiation state (such as a request for
/// NBD_OPT_STRUCTURED_REPLY, or metadata contexts from
/// NBD_OPT_SET_META_CONTEXT) issued before this command." Otherwise a
/// man in the middle can inject options into the encrypted session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_discards_options_negotiated_before_it() {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(certs.path(), "Keel test CA");
    let h = Harness::with_config(256 * MIB, tls_config(&pki, false)).await;
    h.pool.create_volume("vol", 16 * MIB).await.unwrap();
    h.pool.volume("vol").unwrap().write(0, &pattern(6, 4096), false).await.unwrap();
    let mut w = Wire::start(h.addr).await;
    w.structured_reply().await;
    assert_eq!(w.set_meta("vol", &["base:allocation"]).await.unwrap().len(), 1);
    // Upgrade, and go without renegotiating anything.
    let mut t = upgrade(w, &pki.ca).await;
    let e = t.go("vol", &[]).await.unwrap();
    assert_eq!(
        e.flags & proto::tflag::SEND_DF,
        0,
        "structured replies negotiated before STARTTLS still on inside TLS (NBD_FLAG_SEND_DF set: {:#x})",
        e.flags
    );
    // Simple replies only: a read gets a simple reply with the data ...
    assert!(t.read_ok(0, 4096).await == pattern(6, 4096));
    // ... and block status has no context to report.
    let r = t.request(cmd::BLOCK_STATUS, 0, 0, 4096, &[]).await;
    assert_eq!(r.error, proto::errno::EINVAL, "{r:?}");
    t.disconnect().await;
}
