//! The login phase (RFC 7143 section 6): security negotiation (None, CHAP,
//! mutual CHAP) and operational negotiation, one Login Request/Response
//! exchange at a time, as a pure state machine: [`Login::step`] takes the
//! request header and its (reassembled) text and returns the response.

use md5::{Digest, Md5};
use rand::RngCore;

use crate::pdu::{Bhs, op};
use crate::text::{self, Answer, Params};

/// CHAP credentials: the name and secret one side proves it knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chap {
    /// CHAP_N.
    pub user: String,
    /// The shared secret.
    pub secret: String,
}

/// Who may log in to a target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Initiator names allowed; empty allows every initiator.
    pub initiators: Vec<String>,
    /// CHAP the initiator must pass; `None` allows AuthMethod=None.
    pub chap: Option<Chap>,
    /// Credentials the target proves itself with (mutual CHAP); only used
    /// when `chap` is set.
    pub mutual: Option<Chap>,
}

impl Access {
    /// True when `initiator` passes the name ACL.
    pub fn allows(&self, initiator: &str) -> bool {
        self.initiators.is_empty() || self.initiators.iter().any(|i| i.eq_ignore_ascii_case(initiator))
    }
}

/// Login status classes and details (RFC 7143 11.13.5).
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Initiator error (miscellaneous).
    pub const INITIATOR_ERROR: u16 = 0x0200;
    /// Authentication failure.
    pub const AUTH_FAILED: u16 = 0x0201;
    /// Authorization failure (not on the ACL).
    pub const FORBIDDEN: u16 = 0x0202;
    /// Target not found.
    pub const NOT_FOUND: u16 = 0x0203;
    /// Unsupported version.
    pub const BAD_VERSION: u16 = 0x0205;
    /// Missing parameter.
    pub const MISSING_PARAMETER: u16 = 0x0207;
    /// Can't include in session (no multiple connections).
    pub const CANT_INCLUDE: u16 = 0x0208;
    /// Session type not supported.
    pub const SESSION_TYPE: u16 = 0x0209;
    /// Session does not exist.
    pub const NO_SESSION: u16 = 0x020a;
    /// Invalid request during login.
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    /// Target error.
    pub const TARGET_ERROR: u16 = 0x0300;
}

/// Login stages.
const SECURITY: u8 = 0;
const OPERATIONAL: u8 = 1;
const FULL_FEATURE: u8 = 3;

/// What the caller must look up for the login to go on: the login machine
/// knows nothing about targets.
pub trait Directory {
    /// Access rules of `target`, or `None` when no such target exists.
    fn access(&self, target: &str) -> Option<Access>;
    /// Access rules of discovery sessions.
    fn discovery_access(&self) -> Access;
}

/// The kind of session being logged in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionType {
    /// SendTargets only.
    Discovery,
    /// A session to one target.
    Normal,
}

/// Where the CHAP exchange is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    /// Nothing chosen yet.
    Start,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapChosen,
    /// Challenge sent.
    Challenged { id: u8, challenge: Vec<u8> },
    /// Authenticated (or None agreed).
    Done,
}

/// The result of a finished login.
#[derive(Clone, Debug)]
pub struct Established {
    /// Initiator's iSCSI name.
    pub initiator: String,
    /// Target name (empty for discovery).
    pub target: String,
    /// Session type.
    pub kind: SessionType,
    /// ISID.
    pub isid: [u8; 6],
    /// Negotiated parameters.
    pub params: Params,
    /// The CmdSN the full-feature phase starts at.
    pub cmdsn: u32,
    /// StatSN the next response carries.
    pub statsn: u32,
}

/// One response to send, and whether the login is over.
pub struct Step {
    /// Login Response header (data length filled when encoding).
    pub bhs: Bhs,
    /// Its text.
    pub data: Vec<u8>,
    /// `Some` when this response moves the connection to full feature.
    pub done: Option<Established>,
    /// True when this response ends the login in failure: close after it.
    pub failed: bool,
}

/// A login in progress on one connection.
pub struct Login {
    initiator: String,
    target: String,
    kind: Option<SessionType>,
    access: Option<Access>,
    auth: Auth,
    params: Params,
    /// Keys already answered (the operational ones are answered once).
    declared_mrdsl: bool,
    first: bool,
    isid: [u8; 6],
    tsih: u16,
    statsn: u32,
    cmdsn: u32,
    pending_text: Vec<u8>,
    /// Target portal group tag returned to normal sessions.
    tpgt: u16,
    tsih_alloc: u16,
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decode a CHAP binary value: `0x` hex or `0b` base64.
fn unhex(s: &str) -> Option<Vec<u8>> {
    let h = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    if h.len() % 2 != 0 || h.is_empty() {
        return None;
    }
    (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok()).collect()
}

/// CHAP_R = MD5(id || secret || challenge) (RFC 1994).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

impl Login {
    /// A fresh login. `tsih` is the session handle to hand out on success.
    pub fn new(tpgt: u16, tsih: u16) -> Login {
        Login {
            initiator: String::new(),
            target: String::new(),
            kind: None,
            access: None,
            auth: Auth::Start,
            params: Params::default(),
            declared_mrdsl: false,
            first: true,
            isid: [0; 6],
            tsih: 0,
            statsn: 0,
            cmdsn: 0,
            pending_text: Vec::new(),
            tpgt,
            tsih_alloc: tsih,
        }
    }

    fn response(&self, req: &Bhs, transit: bool, csg: u8, nsg: u8, status: u16) -> Bhs {
        let mut b = Bhs::new(op::LOGIN_RESP);
        let mut flags = (csg & 3) << 2;
        if transit {
            flags |= 0x80 | (nsg & 3);
        }
        b.0[1] = flags;
        b.0[2] = 0; // version max
        b.0[3] = 0; // version active
        b.0[8..14].copy_from_slice(&req.0[8..14]);
        b.put_u16(14, if transit && nsg == FULL_FEATURE { self.tsih_alloc } else { self.tsih });
        b.put_u32(16, req.itt());
        b.put_u32(24, self.statsn);
        b.put_u32(28, self.cmdsn);
        b.put_u32(32, self.cmdsn.wrapping_add(crate::session::QUEUE_DEPTH - 1));
        b.0[36] = (status >> 8) as u8;
        b.0[37] = status as u8;
        b
    }

    fn fail(&self, req: &Bhs, status: u16, why: &str) -> Step {
        tracing::info!(initiator = %self.initiator, target = %self.target, "login refused ({status:#06x}): {why}");
        let csg = (req.flags() >> 2) & 3;
        Step { bhs: self.response(req, false, csg, 0, status), data: Vec::new(), done: None, failed: true }
    }

    /// Handle one Login Request (`req`, with its data segment) and produce
    /// the response.
    pub fn step(&mut self, req: &Bhs, data: &[u8], dir: &dyn Directory) -> Step {
        if req.opcode() != op::LOGIN_REQ {
            return self.fail(req, status::INVALID_DURING_LOGIN, "expected a Login Request");
        }
        let flags = req.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        if self.first {
            // Version-max (byte 2) >= 0 >= version-min (byte 3): 0 is
            // the only version.
            if req.0[3] != 0 {
                return self.fail(req, status::BAD_VERSION, "unsupported version");
            }
            self.isid.copy_from_slice(&req.0[8..14]);
            self.tsih = req.u16_at(14);
            self.cmdsn = req.cmdsn();
            self.statsn = req.exp_statsn();
            self.first = false;
            if self.tsih != 0 {
                return self.fail(req, status::CANT_INCLUDE, "adding a connection to a session is not supported");
            }
        }
        if transit && cont {
            return self.fail(req, status::INITIATOR_ERROR, "T and C bits both set");
        }
        if csg == 2 || (transit && (nsg == 2 || nsg <= csg)) {
            return self.fail(req, status::INITIATOR_ERROR, "invalid login stage transition");
        }
        self.pending_text.extend_from_slice(data);
        if cont {
            // More text follows: answer with an empty response.
            let bhs = self.response(req, false, csg, 0, status::SUCCESS);
            return Step { bhs, data: Vec::new(), done: None, failed: false };
        }
        let keys = text::parse(&std::mem::take(&mut self.pending_text));
        let mut out = Vec::new();
        // Declarative session keys first.
        for (k, v) in &keys {
            match k.as_str() {
                "InitiatorName" => self.initiator = v.clone(),
                "TargetName" => self.target = v.clone(),
                "SessionType" => {
                    self.kind = Some(match v.as_str() {
                        "Discovery" => SessionType::Discovery,
                        "Normal" => SessionType::Normal,
                        _ => return self.fail(req, status::SESSION_TYPE, "unknown SessionType"),
                    })
                }
                _ => {}
            }
        }
        if self.access.is_none() {
            if self.initiator.is_empty() {
                return self.fail(req, status::MISSING_PARAMETER, "no InitiatorName");
            }
            let kind = self.kind.get_or_insert(SessionType::Normal).clone();
            let access = match kind {
                SessionType::Discovery => dir.discovery_access(),
                SessionType::Normal => {
                    if self.target.is_empty() {
                        return self.fail(req, status::MISSING_PARAMETER, "no TargetName");
                    }
                    match dir.access(&self.target) {
                        Some(a) => a,
                        None => return self.fail(req, status::NOT_FOUND, "no such target"),
                    }
                }
            };
            if !access.allows(&self.initiator) {
                return self.fail(req, status::FORBIDDEN, "initiator not on the target's ACL");
            }
            self.access = Some(access);
            if kind == SessionType::Normal {
                text::push(&mut out, "TargetPortalGroupTag", &self.tpgt.to_string());
            }
        }
        let access = self.access.clone().expect("set above");
        match csg {
            SECURITY => {
                if let Err(step) = self.security(req, &keys, &access, &mut out) {
                    return *step;
                }
                let agreed = self.auth == Auth::Done;
                if transit && agreed {
                    return self.advance(req, csg, nsg, out);
                }
                let bhs = self.response(req, false, csg, 0, status::SUCCESS);
                Step { bhs, data: out, done: None, failed: false }
            }
            OPERATIONAL => {
                if self.auth != Auth::Done {
                    if access.chap.is_some() {
                        return self.fail(req, status::AUTH_FAILED, "authentication required");
                    }
                    self.auth = Auth::Done;
                }
                for (k, v) in &keys {
                    if matches!(k.as_str(), "InitiatorName" | "TargetName" | "SessionType" | "InitiatorAlias") {
                        continue;
                    }
                    if k.starts_with("CHAP_") || k == "AuthMethod" {
                        return self.fail(req, status::INITIATOR_ERROR, "security keys in the operational stage");
                    }
                    match self.params.negotiate(k, v) {
                        Some(Answer::Reply(a)) => text::push(&mut out, k, &a),
                        Some(Answer::Silent) => {}
                        Some(Answer::Reject(why)) => return self.fail(req, status::INITIATOR_ERROR, &why),
                        None => text::push(&mut out, k, "NotUnderstood"),
                    }
                }
                if !self.declared_mrdsl {
                    text::push(&mut out, "MaxRecvDataSegmentLength", &self.params.max_recv_data.to_string());
                    self.declared_mrdsl = true;
                }
                if transit {
                    return self.advance(req, csg, nsg, out);
                }
                let bhs = self.response(req, false, csg, 0, status::SUCCESS);
                Step { bhs, data: out, done: None, failed: false }
            }
            _ => self.fail(req, status::INITIATOR_ERROR, "invalid current stage"),
        }
    }

    fn advance(&mut self, req: &Bhs, csg: u8, nsg: u8, mut out: Vec<u8>) -> Step {
        if nsg == FULL_FEATURE {
            if !self.declared_mrdsl {
                text::push(&mut out, "MaxRecvDataSegmentLength", &self.params.max_recv_data.to_string());
                self.declared_mrdsl = true;
            }
            self.params.settle();
            let bhs = self.response(req, true, csg, nsg, status::SUCCESS);
            let done = Established {
                initiator: self.initiator.clone(),
                target: self.target.clone(),
                kind: self.kind.clone().unwrap_or(SessionType::Normal),
                isid: self.isid,
                params: self.params.clone(),
                cmdsn: self.cmdsn,
                statsn: self.statsn.wrapping_add(1),
            };
            return Step { bhs, data: out, done: Some(done), failed: false };
        }
        let bhs = self.response(req, true, csg, nsg, status::SUCCESS);
        Step { bhs, data: out, done: None, failed: false }
    }

    fn security(
        &mut self,
        req: &Bhs,
        keys: &[(String, String)],
        access: &Access,
        out: &mut Vec<u8>,
    ) -> Result<(), Box<Step>> {
        let get = |name: &str| keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        for (k, v) in keys {
            if !matches!(k.as_str(), "InitiatorName" | "TargetName" | "SessionType" | "InitiatorAlias" | "AuthMethod")
                && !k.starts_with("CHAP_")
            {
                // Operational keys may be offered in the security stage
                // too; answer them.
                match self.params.negotiate(k, v) {
                    Some(Answer::Reply(a)) => text::push(out, k, &a),
                    Some(Answer::Silent) => {}
                    Some(Answer::Reject(why)) => return Err(Box::new(self.fail(req, status::INITIATOR_ERROR, &why))),
                    None => text::push(out, k, "NotUnderstood"),
                }
            }
        }
        match self.auth.clone() {
            Auth::Start => {
                let Some(methods) = get("AuthMethod") else {
                    if access.chap.is_some() {
                        return Err(Box::new(self.fail(req, status::AUTH_FAILED, "CHAP required but not offered")));
                    }
                    self.auth = Auth::Done;
                    return Ok(());
                };
                let offered: Vec<&str> = methods.split(',').collect();
                if access.chap.is_some() {
                    if !offered.contains(&"CHAP") {
                        return Err(Box::new(self.fail(req, status::AUTH_FAILED, "CHAP required but not offered")));
                    }
                    text::push(out, "AuthMethod", "CHAP");
                    self.auth = Auth::ChapChosen;
                } else if offered.contains(&"None") {
                    text::push(out, "AuthMethod", "None");
                    self.auth = Auth::Done;
                } else {
                    return Err(Box::new(self.fail(
                        req,
                        status::AUTH_FAILED,
                        "no acceptable AuthMethod (this target has no CHAP)",
                    )));
                }
                Ok(())
            }
            Auth::ChapChosen => {
                let Some(algs) = get("CHAP_A") else {
                    return Err(Box::new(self.fail(req, status::AUTH_FAILED, "expected CHAP_A")));
                };
                if !algs.split(',').any(|a| a == "5") {
                    return Err(Box::new(self.fail(req, status::AUTH_FAILED, "only CHAP_A=5 (MD5) is supported")));
                }
                let mut challenge = vec![0u8; 16];
                rand::thread_rng().fill_bytes(&mut challenge);
                let id = rand::thread_rng().next_u32() as u8;
                text::push(out, "CHAP_A", "5");
                text::push(out, "CHAP_I", &id.to_string());
                text::push(out, "CHAP_C", &hex(&challenge));
                self.auth = Auth::Challenged { id, challenge };
                Ok(())
            }
            Auth::Challenged { id, challenge } => {
                let chap = access.chap.as_ref().expect("CHAP chosen only when configured");
                let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(Box::new(self.fail(req, status::AUTH_FAILED, "expected CHAP_N and CHAP_R")));
                };
                let want = chap_response(id, chap.secret.as_bytes(), &challenge);
                if name != chap.user || unhex(resp).as_deref() != Some(&want[..]) {
                    return Err(Box::new(self.fail(req, status::AUTH_FAILED, "wrong CHAP name or secret")));
                }
                match (get("CHAP_I"), get("CHAP_C"), &access.mutual) {
                    (Some(i), Some(c), Some(mutual)) => {
                        let Ok(i) = i.parse::<u8>() else {
                            return Err(Box::new(self.fail(req, status::AUTH_FAILED, "bad CHAP_I")));
                        };
                        let Some(c) = unhex(c).filter(|c| !c.is_empty() && *c != challenge) else {
                            return Err(Box::new(self.fail(req, status::AUTH_FAILED, "bad or reflected CHAP_C")));
                        };
                        text::push(out, "CHAP_N", &mutual.user);
                        text::push(out, "CHAP_R", &hex(&chap_response(i, mutual.secret.as_bytes(), &c)));
                    }
                    (None, None, None) => {}
                    (None, None, Some(_)) => {
                        return Err(Box::new(self.fail(req, status::AUTH_FAILED, "mutual CHAP required")));
                    }
                    (Some(_), _, None) | (_, Some(_), None) => {
                        return Err(Box::new(self.fail(
                            req,
                            status::AUTH_FAILED,
                            "mutual CHAP asked but not configured",
                        )));
                    }
                    _ => return Err(Box::new(self.fail(req, status::AUTH_FAILED, "incomplete mutual CHAP"))),
                }
                self.auth = Auth::Done;
                Ok(())
            }
            Auth::Done => Ok(()),
        }
    }
}

/// Feed arbitrary bytes to a login as a sequence of Login Request PDUs
/// (48-byte header, then up to 255 bytes of text): the fuzz target's entry
/// point. Must never panic, whatever the bytes.
pub fn fuzz_login(bytes: &[u8]) {
    struct Open;
    impl Directory for Open {
        fn access(&self, target: &str) -> Option<Access> {
            let chap = target.ends_with('c').then(|| Chap { user: "u".into(), secret: "s3cret-s3cret".into() });
            Some(Access { initiators: Vec::new(), chap, mutual: None })
        }
        fn discovery_access(&self) -> Access {
            Access::default()
        }
    }
    let mut login = Login::new(1, 1);
    let mut rest = bytes;
    while rest.len() >= crate::pdu::BHS_LEN {
        let bhs = Bhs(rest[..crate::pdu::BHS_LEN].try_into().expect("48 bytes"));
        rest = &rest[crate::pdu::BHS_LEN..];
        let n = bhs.data_len().min(rest.len()).min(255);
        let step = login.step(&bhs, &rest[..n], &Open);
        rest = &rest[n..];
        if step.failed || step.done.is_some() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(Access);
    impl Directory for Dir {
        fn access(&self, target: &str) -> Option<Access> {
            (target == "iqn.t").then(|| self.0.clone())
        }
        fn discovery_access(&self) -> Access {
            Access::default()
        }
    }

    fn req(csg: u8, nsg: u8, transit: bool) -> Bhs {
        let mut b = Bhs::new(op::LOGIN_REQ);
        b.0[0] |= 0x40;
        b.0[1] = (csg << 2) | if transit { 0x80 | nsg } else { 0 };
        b.0[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        b
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in pairs {
            text::push(&mut out, k, v);
        }
        out
    }

    fn keys(step: &Step) -> Vec<(String, String)> {
        text::parse(&step.data)
    }

    fn value<'a>(ks: &'a [(String, String)], k: &str) -> Option<&'a str> {
        ks.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn no_auth_login_reaches_full_feature() {
        let dir = Dir(Access::default());
        let mut l = Login::new(1, 7);
        let s = l.step(
            &req(0, 1, true),
            &kv(&[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t"), ("AuthMethod", "None")]),
            &dir,
        );
        assert!(!s.failed);
        assert_eq!(value(&keys(&s), "AuthMethod"), Some("None"));
        assert_eq!(s.bhs.0[1] & 0x83, 0x81);
        let s = l.step(&req(1, 3, true), &kv(&[("HeaderDigest", "CRC32C,None"), ("MaxBurstLength", "1048576")]), &dir);
        let est = s.done.expect("full feature");
        assert!(est.params.header_digest);
        assert_eq!(est.params.max_burst, 1048576);
        assert_eq!(s.bhs.u16_at(14), 7);
    }

    #[test]
    fn mutual_chap_proves_both_sides_and_wrong_secret_fails() {
        let access = Access {
            initiators: vec![],
            chap: Some(Chap { user: "u".into(), secret: "initiator-secret".into() }),
            mutual: Some(Chap { user: "tgt".into(), secret: "target-secret-1".into() }),
        };
        let dir = Dir(access);
        for right in [true, false] {
            let mut l = Login::new(1, 7);
            let s = l.step(
                &req(0, 1, false),
                &kv(&[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t"), ("AuthMethod", "CHAP,None")]),
                &dir,
            );
            assert_eq!(value(&keys(&s), "AuthMethod"), Some("CHAP"));
            let s = l.step(&req(0, 1, false), &kv(&[("CHAP_A", "5")]), &dir);
            let ks = keys(&s);
            let id: u8 = value(&ks, "CHAP_I").unwrap().parse().unwrap();
            let c = unhex(value(&ks, "CHAP_C").unwrap()).unwrap();
            let secret = if right { "initiator-secret" } else { "wrong-secret-xx" };
            let r = hex(&chap_response(id, secret.as_bytes(), &c));
            let mine = [9u8; 16];
            let s = l.step(
                &req(0, 1, true),
                &kv(&[("CHAP_N", "u"), ("CHAP_R", &r), ("CHAP_I", "3"), ("CHAP_C", &hex(&mine))]),
                &dir,
            );
            assert_eq!(s.failed, !right);
            if right {
                let ks = keys(&s);
                assert_eq!(value(&ks, "CHAP_N"), Some("tgt"));
                assert_eq!(value(&ks, "CHAP_R").unwrap(), hex(&chap_response(3, b"target-secret-1", &mine)));
            } else {
                assert_eq!(s.bhs.u16_at(36), status::AUTH_FAILED);
            }
        }
    }

    #[test]
    fn acl_and_unknown_target_are_refused() {
        let dir = Dir(Access { initiators: vec!["iqn.allowed".into()], ..Access::default() });
        let mut l = Login::new(1, 7);
        let s = l.step(&req(1, 3, true), &kv(&[("InitiatorName", "iqn.other"), ("TargetName", "iqn.t")]), &dir);
        assert!(s.failed);
        assert_eq!(s.bhs.u16_at(36), status::FORBIDDEN);
        let mut l = Login::new(1, 7);
        let s = l.step(&req(1, 3, true), &kv(&[("InitiatorName", "iqn.allowed"), ("TargetName", "iqn.nope")]), &dir);
        assert_eq!(s.bhs.u16_at(36), status::NOT_FOUND);
    }
}
