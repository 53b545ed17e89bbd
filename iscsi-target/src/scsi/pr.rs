//! Persistent reservations (SPC-4 5.13): registrations, the reservation
//! and its type, PERSISTENT RESERVE IN/OUT, and the access check every
//! command goes through.

use keel_blockstore::BlockDevice;

use super::sense::SenseError;
use super::{Access, Fail, LogicalUnit, Nexus, Outcome, Port, truncate};

/// Reservation types.
pub(super) mod rtype {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WE_REGISTRANTS_ONLY: u8 = 5;
    pub const EA_REGISTRANTS_ONLY: u8 = 6;
    pub const WE_ALL_REGISTRANTS: u8 = 7;
    pub const EA_ALL_REGISTRANTS: u8 = 8;
}

/// PERSISTENT RESERVE OUT service actions.
mod action {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
}

fn all_registrants(t: u8) -> bool {
    matches!(t, rtype::WE_ALL_REGISTRANTS | rtype::EA_ALL_REGISTRANTS)
}

fn registrants_only(t: u8) -> bool {
    matches!(t, rtype::WE_REGISTRANTS_ONLY | rtype::EA_REGISTRANTS_ONLY)
}

#[derive(Clone, Debug)]
struct Registration {
    port: Port,
    rel_port_id: u16,
    key: u64,
}

#[derive(Clone, Debug)]
struct Reservation {
    /// The holder; for the all-registrants types every registrant holds it
    /// and this is whoever reserved.
    holder: Port,
    rtype: u8,
}

/// Registrations and the reservation of one LU.
#[derive(Default, Debug)]
pub(super) struct PrState {
    generation: u32,
    regs: Vec<Registration>,
    res: Option<Reservation>,
}

impl PrState {
    pub(super) fn has_registrations(&self) -> bool {
        !self.regs.is_empty()
    }

    fn registration(&self, port: &Port) -> Option<&Registration> {
        self.regs.iter().find(|r| &r.port == port)
    }

    fn is_holder(&self, port: &Port) -> bool {
        match &self.res {
            None => false,
            Some(r) if all_registrants(r.rtype) => self.registration(port).is_some(),
            Some(r) => &r.holder == port,
        }
    }

    /// True when the reservation forbids `access` through `port`.
    pub(super) fn conflicts(&self, port: &Port, access: Access) -> bool {
        let Some(res) = &self.res else { return false };
        if access == Access::Always || self.is_holder(port) {
            return false;
        }
        let registered = self.registration(port).is_some();
        match res.rtype {
            rtype::WRITE_EXCLUSIVE => access == Access::Write,
            rtype::EXCLUSIVE_ACCESS => true,
            rtype::WE_REGISTRANTS_ONLY | rtype::WE_ALL_REGISTRANTS => access == Access::Write && !registered,
            _ => !registered,
        }
    }

    /// Drop the registration of `port`, releasing what it held (SPC-4 5.13.11.2.3).
    fn unregister(&mut self, port: &Port) -> Vec<(Port, u8, u8)> {
        let mut uas = Vec::new();
        let was_holder = self.is_holder(port);
        self.regs.retain(|r| &r.port != port);
        if let Some(res) = self.res.clone() {
            let release = if all_registrants(res.rtype) { self.regs.is_empty() } else { was_holder };
            if release {
                self.res = None;
                if registrants_only(res.rtype) {
                    uas.extend(self.regs.iter().map(|r| (r.port.clone(), 0x2A, 0x04))); // RESERVATIONS RELEASED
                }
            } else if all_registrants(res.rtype) && &res.holder == port {
                // Another registrant still holds it; record one of them.
                if let Some(first) = self.regs.first() {
                    self.res = Some(Reservation { holder: first.port.clone(), rtype: res.rtype });
                }
            }
        }
        uas
    }

    fn reservation_key(&self) -> u64 {
        match &self.res {
            Some(r) if !all_registrants(r.rtype) => self.registration(&r.holder).map_or(0, |g| g.key),
            _ => 0,
        }
    }
}

/// An iSCSI TransportID with ISID (SPC-4 7.6.4.6, format 01b).
fn transport_id(p: &Port) -> Vec<u8> {
    let isid: String = p.isid.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = format!("{},i,0x{isid}", p.initiator).into_bytes();
    name.push(0);
    name.resize((name.len().div_ceil(4) * 4).max(20), 0);
    let mut d = vec![0x40 | 0x05, 0];
    d.extend_from_slice(&(name.len() as u16).to_be_bytes());
    d.extend(name);
    d
}

impl<D: BlockDevice + 'static> LogicalUnit<D> {
    pub(super) fn pr_in(&self, action: u8, alloc: u16) -> Outcome {
        let st = self.state.lock();
        let pr = &st.pr;
        let mut d = pr.generation.to_be_bytes().to_vec();
        d.extend_from_slice(&[0; 4]);
        match action {
            0 => {
                for r in &pr.regs {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            1 => {
                if let Some(res) = &pr.res {
                    d.extend_from_slice(&pr.reservation_key().to_be_bytes());
                    d.extend_from_slice(&[0; 5]);
                    d.push(res.rtype & 0x0F); // scope 0 (LU)
                    d.extend_from_slice(&[0; 2]);
                }
            }
            2 => {
                // REPORT CAPABILITIES: CRH, ATP_C; TMV with every type.
                let d = vec![0, 8, 0x10 | 0x04, 0x80, 0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01, 0, 0];
                return Ok(truncate(d, alloc as u32));
            }
            _ => {
                for r in &pr.regs {
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    let holder = pr.is_holder(&r.port);
                    d.push(if holder { 0x01 } else { 0 });
                    d.push(if holder { pr.res.as_ref().map_or(0, |x| x.rtype) } else { 0 });
                    d.extend_from_slice(&[0; 4]);
                    d.extend_from_slice(&r.rel_port_id.to_be_bytes());
                    let tid = transport_id(&r.port);
                    d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend(tid);
                }
            }
        }
        let n = (d.len() - 8) as u32;
        d[4..8].copy_from_slice(&n.to_be_bytes());
        Ok(truncate(d, alloc as u32))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn pr_out(
        &self,
        nexus: &Nexus,
        port: &Port,
        act: u8,
        scope: u8,
        rtype: u8,
        param_len: u32,
        data: &[u8],
    ) -> Outcome {
        use action::*;
        if act > REGISTER_AND_IGNORE {
            return Err(SenseError::invalid_field_in_cdb(1, Some(4)).into()); // REGISTER AND MOVE
        }
        if param_len != 24 {
            return Err(SenseError::param_list_length().into());
        }
        let p = data.get(..24).ok_or_else(SenseError::param_list_length)?;
        let key = u64::from_be_bytes(p[0..8].try_into().unwrap_or_default());
        let sa_key = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default());
        let flags = p[20];
        if flags & 0x08 != 0 {
            return Err(SenseError::invalid_field_in_param(20, Some(3)).into()); // SPEC_I_PT
        }
        if flags & 0x01 != 0 {
            return Err(SenseError::invalid_field_in_param(20, Some(0)).into()); // APTPL
        }
        let needs_type = matches!(act, RESERVE | RELEASE | PREEMPT | PREEMPT_AND_ABORT);
        if needs_type {
            if scope != 0 {
                return Err(SenseError::invalid_field_in_cdb(2, Some(7)).into());
            }
            if !matches!(rtype, 1 | 3 | 5 | 6 | 7 | 8) {
                return Err(SenseError::invalid_field_in_cdb(2, Some(3)).into());
            }
        }
        let mut st = self.state.lock();
        let pr = &mut st.pr;
        let mine = pr.registration(port).map(|r| r.key);
        let mut uas: Vec<(Port, u8, u8)> = Vec::new();
        match act {
            REGISTER | REGISTER_AND_IGNORE => {
                match mine {
                    None => {
                        if act == REGISTER && key != 0 {
                            return Err(Fail::Conflict);
                        }
                        if sa_key == 0 {
                            return Ok(Vec::new()); // nothing to register or drop
                        }
                        pr.regs.push(Registration { port: port.clone(), rel_port_id: nexus.rel_port_id, key: sa_key });
                    }
                    Some(k) => {
                        if act == REGISTER && key != k {
                            return Err(Fail::Conflict);
                        }
                        if sa_key == 0 {
                            uas = pr.unregister(port);
                        } else if let Some(r) = pr.regs.iter_mut().find(|r| &r.port == port) {
                            r.key = sa_key;
                        }
                    }
                }
                pr.generation = pr.generation.wrapping_add(1);
            }
            _ => {
                if mine != Some(key) {
                    return Err(Fail::Conflict);
                }
                match act {
                    RESERVE => match &pr.res {
                        Some(r) if pr.is_holder(port) && r.rtype == rtype => {}
                        Some(_) => return Err(Fail::Conflict),
                        None => pr.res = Some(Reservation { holder: port.clone(), rtype }),
                    },
                    RELEASE => {
                        if let Some(r) = pr.res.clone()
                            && pr.is_holder(port)
                        {
                            if r.rtype != rtype {
                                return Err(SenseError::new(super::sense::key::ILLEGAL_REQUEST, 0x26, 0x04).into());
                            }
                            pr.res = None;
                            if registrants_only(r.rtype) || all_registrants(r.rtype) {
                                uas.extend(
                                    pr.regs.iter().filter(|g| &g.port != port).map(|g| (g.port.clone(), 0x2A, 0x04)),
                                );
                            }
                        }
                    }
                    CLEAR => {
                        uas.extend(pr.regs.iter().filter(|g| &g.port != port).map(|g| (g.port.clone(), 0x2A, 0x03)));
                        pr.regs.clear();
                        pr.res = None;
                        pr.generation = pr.generation.wrapping_add(1);
                    }
                    _ => uas = preempt(pr, port, sa_key, rtype)?,
                }
            }
        }
        for (p, asc, ascq) in uas {
            st.push_ua(&p, asc, ascq);
        }
        Ok(Vec::new())
    }
}

/// PREEMPT (and PREEMPT AND ABORT, whose abort is the same here: commands
/// are not queued in this layer) (SPC-4 5.13.11.2.4).
fn preempt(pr: &mut PrState, port: &Port, sa_key: u64, rtype: u8) -> Result<Vec<(Port, u8, u8)>, Fail> {
    let mut uas = Vec::new();
    let mut remove = |pr: &mut PrState, pred: &dyn Fn(&Registration) -> bool| -> usize {
        let before = pr.regs.len();
        let gone: Vec<Port> = pr.regs.iter().filter(|r| &r.port != port && pred(r)).map(|r| r.port.clone()).collect();
        pr.regs.retain(|r| !gone.contains(&r.port));
        uas.extend(gone.into_iter().map(|p| (p, 0x2A, 0x05))); // REGISTRATIONS PREEMPTED
        before - pr.regs.len()
    };
    match pr.res.clone() {
        None => {
            if sa_key == 0 {
                return Err(SenseError::invalid_field_in_param(8, None).into());
            }
            if remove(pr, &|r| r.key == sa_key) == 0 && !pr.regs.iter().any(|r| r.key == sa_key) {
                return Err(Fail::Conflict);
            }
        }
        Some(res) if all_registrants(res.rtype) => {
            if sa_key == 0 {
                remove(pr, &|_| true);
                pr.res = Some(Reservation { holder: port.clone(), rtype });
            } else if remove(pr, &|r| r.key == sa_key) == 0 && !pr.regs.iter().any(|r| r.key == sa_key) {
                return Err(Fail::Conflict);
            }
        }
        Some(res) => {
            let holder_key = pr.registration(&res.holder).map_or(0, |r| r.key);
            if sa_key == holder_key {
                remove(pr, &|r| r.key == sa_key);
                pr.res = Some(Reservation { holder: port.clone(), rtype });
            } else {
                if sa_key == 0 {
                    return Err(SenseError::invalid_field_in_param(8, None).into());
                }
                if remove(pr, &|r| r.key == sa_key) == 0 && !pr.regs.iter().any(|r| r.key == sa_key) {
                    return Err(Fail::Conflict);
                }
            }
        }
    }
    pr.generation = pr.generation.wrapping_add(1);
    Ok(uas)
}
