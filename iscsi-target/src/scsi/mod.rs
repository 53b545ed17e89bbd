//! Minimal SCSI layer used while the full SPC/SBC layer is built on its own
//! branch: same interface, few commands.

use std::sync::Arc;

use keel_blockstore::BlockDevice;

/// Identity of a logical unit.
pub struct LuIdentity {
    /// Volume name.
    pub name: String,
    /// Unit serial number.
    pub serial: String,
    /// NAA-6 identifier.
    pub naa: u64,
    /// Target IQN.
    pub target_name: String,
}

/// One I_T nexus.
#[derive(Clone, Debug)]
pub struct Nexus {
    /// Process-unique id.
    pub id: u64,
    /// Initiator name.
    pub initiator_name: String,
    /// ISID.
    pub isid: [u8; 6],
    /// "IQN,t,0x0001".
    pub target_port_name: String,
    /// Relative target port id.
    pub rel_port_id: u16,
}

/// A command.
pub struct Command<'a> {
    /// CDB bytes.
    pub cdb: &'a [u8],
    /// Data-Out.
    pub data_out: &'a [u8],
    /// LUN.
    pub lun: u64,
}

/// A response.
#[derive(Debug, Default)]
pub struct Response {
    /// SCSI status.
    pub status: u8,
    /// Sense data.
    pub sense: Vec<u8>,
    /// Data-In.
    pub data_in: Vec<u8>,
}

/// Reset kinds.
#[derive(Clone, Copy, Debug)]
pub enum ResetKind {
    /// LUN RESET.
    Lun,
    /// TARGET WARM RESET.
    TargetWarm,
    /// TARGET COLD RESET.
    TargetCold,
}

/// A logical unit over a block device.
pub struct LogicalUnit<D: BlockDevice> {
    dev: Arc<D>,
    id: LuIdentity,
}

fn sense(key: u8, asc: u8, ascq: u8) -> Response {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    Response { status: 2, sense: s, data_in: Vec::new() }
}

impl<D: BlockDevice + 'static> LogicalUnit<D> {
    /// New LU.
    pub fn new(dev: Arc<D>, id: LuIdentity) -> Self {
        LogicalUnit { dev, id }
    }

    fn rw(cdb: &[u8]) -> Option<(u64, u32)> {
        Some(match cdb.first()? {
            0x28 | 0x2a if cdb.len() >= 10 => {
                (u32::from_be_bytes(cdb[2..6].try_into().ok()?) as u64, u16::from_be_bytes([cdb[7], cdb[8]]) as u32)
            }
            0x88 | 0x8a if cdb.len() >= 16 => {
                (u64::from_be_bytes(cdb[2..10].try_into().ok()?), u32::from_be_bytes(cdb[10..14].try_into().ok()?))
            }
            _ => return None,
        })
    }

    /// Data-Out bytes of a CDB.
    pub fn data_out_len(&self, cdb: &[u8]) -> u32 {
        match cdb.first() {
            Some(0x2a | 0x8a) => Self::rw(cdb).map(|(_, n)| n * 512).unwrap_or(0),
            _ => 0,
        }
    }

    /// Execute.
    pub async fn execute(&self, _nexus: &Nexus, cmd: Command<'_>) -> Response {
        let cdb = cmd.cdb;
        let blocks = self.dev.size() / 512;
        match cdb.first().copied().unwrap_or(0) {
            0x00 => Response::default(),
            0x12 => {
                let mut d = vec![0u8; 36];
                d[2] = 6;
                d[3] = 2;
                d[4] = 31;
                d[8..16].copy_from_slice(b"KEEL    ");
                d[16..32].copy_from_slice(b"Keel volume     ");
                d[32..36].copy_from_slice(b"0001");
                let _ = &self.id.name;
                let alloc = u16::from_be_bytes([cdb[3], cdb[4]]) as usize;
                d.truncate(alloc);
                Response { data_in: d, ..Default::default() }
            }
            0x25 => {
                let mut d = vec![0u8; 8];
                d[0..4].copy_from_slice(&((blocks - 1).min(0xffff_ffff) as u32).to_be_bytes());
                d[4..8].copy_from_slice(&512u32.to_be_bytes());
                Response { data_in: d, ..Default::default() }
            }
            0x9e => {
                let mut d = vec![0u8; 32];
                d[0..8].copy_from_slice(&(blocks - 1).to_be_bytes());
                d[8..12].copy_from_slice(&512u32.to_be_bytes());
                d[13] = 3;
                let alloc = u32::from_be_bytes(cdb[10..14].try_into().unwrap_or([0; 4])) as usize;
                d.truncate(alloc);
                Response { data_in: d, ..Default::default() }
            }
            0xa0 => {
                let mut d = vec![0u8; 16];
                d[3] = 8;
                Response { data_in: d, ..Default::default() }
            }
            0x35 | 0x91 => match self.dev.flush().await {
                Ok(()) => Response::default(),
                Err(_) => sense(4, 0, 0),
            },
            op @ (0x28 | 0x2a | 0x88 | 0x8a) => {
                let Some((lba, n)) = Self::rw(cdb) else { return sense(5, 0x24, 0) };
                if lba + n as u64 > blocks {
                    return sense(5, 0x21, 0);
                }
                if op == 0x28 || op == 0x88 {
                    let mut buf = vec![0u8; n as usize * 512];
                    match self.dev.read(lba * 512, &mut buf).await {
                        Ok(()) => Response { data_in: buf, ..Default::default() },
                        Err(_) => sense(3, 0x11, 0),
                    }
                } else {
                    let fua = cdb[1] & 0x08 != 0;
                    match self.dev.write(lba * 512, cmd.data_out, fua).await {
                        Ok(()) => Response::default(),
                        Err(_) => sense(4, 0, 0),
                    }
                }
            }
            _ => sense(5, 0x20, 0),
        }
    }

    /// I_T nexus loss.
    pub fn nexus_lost(&self, _nexus: &Nexus) {}

    /// Reset.
    pub fn reset(&self, _by: &Nexus, _kind: ResetKind) {}
}

/// Response for a LUN that does not exist.
pub fn no_such_lun(cmd: Command<'_>) -> Response {
    match cmd.cdb.first() {
        Some(0x12) => Response { data_in: vec![0x7f, 0, 6, 2, 31, 0, 0, 0], ..Default::default() },
        Some(0xa0) => {
            let mut d = vec![0u8; 16];
            d[3] = 8;
            Response { data_in: d, ..Default::default() }
        }
        _ => sense(5, 0x25, 0),
    }
}
