//! iSCSI text keys (RFC 7143 section 6 and 13): `key=value` pairs separated
//! by NUL bytes, and the negotiation of the operational parameters.

/// Parse a text data segment into `(key, value)` pairs in order. Pairs
/// without `=` are returned with an empty value and flagged by the caller as
/// malformed. Stops at nothing: trailing NULs and empty entries are skipped.
pub fn parse(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let s = String::from_utf8_lossy(kv);
            match s.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (s.to_string(), String::new()),
            }
        })
        .collect()
}

/// Append `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// The session and connection parameters in force (RFC 7143 section 13),
/// from the target's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// CRC32C header digests.
    pub header_digest: bool,
    /// CRC32C data digests.
    pub data_digest: bool,
    /// Largest data segment the initiator accepts (we send no more).
    pub max_send_data: u32,
    /// Largest data segment we accept (we declared it).
    pub max_recv_data: u32,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// DefaultTime2Wait.
    pub time2wait: u32,
    /// DefaultTime2Retain.
    pub time2retain: u32,
}

impl Default for Params {
    /// RFC 7143's defaults, except what we declare ourselves.
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            max_send_data: 8192,
            max_recv_data: MAX_RECV_DATA,
            max_burst: 262144,
            first_burst: 65536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            time2wait: 2,
            time2retain: 20,
        }
    }
}

/// The MaxRecvDataSegmentLength we declare.
pub const MAX_RECV_DATA: u32 = 256 * 1024;
/// Largest MaxBurstLength we accept.
pub const MAX_BURST: u32 = 16 << 20;

/// What a key's negotiation produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Reply `key=value`.
    Reply(String),
    /// A declarative key: nothing to reply.
    Silent,
    /// The value was out of its legal range: the login fails.
    Reject(String),
}

fn numeric(v: &str, lo: u32, hi: u32) -> Option<u32> {
    let n: u64 = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else {
        v.parse().ok()?
    };
    (lo as u64..=hi as u64).contains(&n).then_some(n as u32)
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

impl Params {
    /// Negotiate one operational key the initiator offered; `None` when the
    /// key is not an operational one (the caller handles it).
    pub fn negotiate(&mut self, key: &str, value: &str) -> Option<Answer> {
        let bad = || Answer::Reject(format!("{key}={value} is out of range"));
        let a = match key {
            "HeaderDigest" | "DataDigest" => {
                let crc = value.split(',').find(|v| *v == "CRC32C" || *v == "None");
                match crc {
                    Some(choice) => {
                        let on = choice == "CRC32C";
                        if key == "HeaderDigest" {
                            self.header_digest = on;
                        } else {
                            self.data_digest = on;
                        }
                        Answer::Reply(choice.to_string())
                    }
                    None => Answer::Reply("Reject".into()),
                }
            }
            "MaxRecvDataSegmentLength" => match numeric(value, 512, (1 << 24) - 1) {
                Some(n) => {
                    self.max_send_data = n;
                    Answer::Silent
                }
                None => bad(),
            },
            "MaxBurstLength" => match numeric(value, 512, (1 << 24) - 1) {
                Some(n) => {
                    self.max_burst = n.min(MAX_BURST);
                    Answer::Reply(self.max_burst.to_string())
                }
                None => bad(),
            },
            "FirstBurstLength" => match numeric(value, 512, (1 << 24) - 1) {
                Some(n) => {
                    self.first_burst = n.min(MAX_BURST);
                    Answer::Reply(self.first_burst.to_string())
                }
                None => bad(),
            },
            "InitialR2T" => match boolean(value) {
                Some(b) => {
                    self.initial_r2t = b;
                    Answer::Reply(yes_no(b))
                }
                None => bad(),
            },
            "ImmediateData" => match boolean(value) {
                Some(b) => {
                    self.immediate_data = b;
                    Answer::Reply(yes_no(b))
                }
                None => bad(),
            },
            "MaxOutstandingR2T" => match numeric(value, 1, 65535) {
                Some(n) => {
                    self.max_outstanding_r2t = n.min(16);
                    Answer::Reply(self.max_outstanding_r2t.to_string())
                }
                None => bad(),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match boolean(value) {
                // OR functions: answering Yes makes the result Yes, which is
                // what we prefer (and handle either way).
                Some(_) => Answer::Reply("Yes".into()),
                None => bad(),
            },
            "ErrorRecoveryLevel" => match numeric(value, 0, 2) {
                // Min function: we do level 0 only.
                Some(_) => Answer::Reply("0".into()),
                None => bad(),
            },
            "MaxConnections" => match numeric(value, 1, 65535) {
                // Min function: one connection per session.
                Some(_) => Answer::Reply("1".into()),
                None => bad(),
            },
            "DefaultTime2Wait" => match numeric(value, 0, 3600) {
                Some(n) => {
                    self.time2wait = n.max(2);
                    Answer::Reply(self.time2wait.to_string())
                }
                None => bad(),
            },
            "DefaultTime2Retain" => match numeric(value, 0, 3600) {
                Some(_) => {
                    self.time2retain = 0;
                    Answer::Reply("0".into())
                }
                None => bad(),
            },
            "IFMarker" | "OFMarker" => Answer::Reply("No".into()),
            "IFMarkInt" | "OFMarkInt" => Answer::Reply("Irrelevant".into()),
            _ => return None,
        };
        Some(a)
    }

    /// After negotiation: FirstBurstLength may not exceed MaxBurstLength.
    pub fn settle(&mut self) {
        if self.first_burst > self.max_burst {
            self.first_burst = self.max_burst;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_encodes_pairs() {
        let mut out = Vec::new();
        push(&mut out, "InitiatorName", "iqn.x");
        push(&mut out, "SessionType", "Normal");
        out.push(0);
        assert_eq!(
            parse(&out),
            vec![("InitiatorName".into(), "iqn.x".into()), ("SessionType".into(), "Normal".into())]
        );
    }

    #[test]
    fn negotiates_per_rfc_functions() {
        let mut p = Params::default();
        assert_eq!(p.negotiate("HeaderDigest", "CRC32C,None"), Some(Answer::Reply("CRC32C".into())));
        assert!(p.header_digest);
        assert_eq!(p.negotiate("DataDigest", "None"), Some(Answer::Reply("None".into())));
        assert_eq!(p.negotiate("MaxBurstLength", "1048576"), Some(Answer::Reply("1048576".into())));
        assert_eq!(p.negotiate("FirstBurstLength", "262144"), Some(Answer::Reply("262144".into())));
        assert_eq!(p.negotiate("MaxRecvDataSegmentLength", "65536"), Some(Answer::Silent));
        assert_eq!(p.max_send_data, 65536);
        assert_eq!(p.negotiate("ErrorRecoveryLevel", "2"), Some(Answer::Reply("0".into())));
        assert!(matches!(p.negotiate("MaxBurstLength", "12"), Some(Answer::Reject(_))));
        assert_eq!(p.negotiate("X-com.example.thing", "1"), None);
    }
}
