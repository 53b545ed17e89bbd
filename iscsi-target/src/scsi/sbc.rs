//! Block commands (SBC-4): reads, writes, verify, thin provisioning.

use keel_blockstore::BlockDevice;

use super::cdb::{Range, Size};
use super::sense::SenseError;
use super::{
    ATOMIC_BLOCKS, BLOCK, Fail, LogicalUnit, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BLOCKS, MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS, Outcome, dev_err, truncate,
};

const B: u64 = BLOCK as u64;
/// Bytes per device call when a command is split (WRITE SAME, SANITIZE).
const CHUNK: u64 = 1 << 20;
/// Bytes of the allocation map GET LBA STATUS reads per call.
const LBA_STATUS_WINDOW: u64 = 1 << 30;
/// Descriptors one GET LBA STATUS returns at most (1 MiB of parameter data).
const LBA_STATUS_MAX_DESCRIPTORS: u32 = 65536;
/// Bytes of the allocation map one GET LBA STATUS reads at most.
const LBA_STATUS_SCAN: u64 = 256 << 30;

/// First byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

impl<D: BlockDevice + 'static> LogicalUnit<D> {
    /// Byte offset and length of `r`, or LBA OUT OF RANGE.
    pub(super) fn check_range(&self, r: Range) -> Result<(u64, u64), SenseError> {
        let end = r.lba.checked_add(r.blocks as u64).ok_or_else(SenseError::lba_out_of_range)?;
        if r.lba > self.blocks() || end > self.blocks() {
            return Err(SenseError::lba_out_of_range());
        }
        Ok((r.lba * B, r.blocks as u64 * B))
    }

    /// Range checks for a data transfer: bounds, then the transfer limit.
    fn check_transfer(&self, r: Range) -> Result<(u64, u64), SenseError> {
        let (off, len) = self.check_range(r)?;
        if r.blocks > MAX_TRANSFER_BLOCKS {
            return Err(SenseError::invalid_field_in_cdb(7, None));
        }
        Ok((off, len))
    }

    fn check_writable(&self) -> Result<(), SenseError> {
        if self.write_protected() { Err(SenseError::write_protected()) } else { Ok(()) }
    }

    /// The first `len` bytes of a parameter list, or PARAMETER LIST LENGTH
    /// ERROR when the initiator sent fewer.
    fn payload(data: &[u8], len: u64) -> Result<&[u8], SenseError> {
        data.get(..len as usize).ok_or_else(SenseError::param_list_length)
    }

    /// The first `len` bytes of block data. Fewer (an iSCSI expected data
    /// transfer length below the CDB's transfer length) is answered with
    /// INVALID FIELD IN COMMAND INFORMATION UNIT and nothing is written
    /// (FCP-4 9.4.2 option b, which libiscsi's residual tests accept).
    fn block_payload(data: &[u8], len: u64) -> Result<&[u8], SenseError> {
        data.get(..len as usize).ok_or_else(SenseError::invalid_field_in_iu)
    }

    pub(super) async fn read(&self, r: Range) -> Outcome {
        let (off, len) = self.check_transfer(r)?;
        let mut buf = vec![0u8; len as usize];
        if len > 0 {
            self.dev.read(off, &mut buf).await.map_err(dev_err)?;
        }
        Ok(buf)
    }

    /// WRITE and WRITE AND VERIFY; with `atomic`, WRITE ATOMIC(16): whole
    /// store blocks (aligned to and a multiple of [`ATOMIC_BLOCKS`]) through
    /// the store's all-or-nothing write.
    pub(super) async fn write(&self, r: Range, fua: bool, data: &[u8], atomic: bool) -> Outcome {
        let (off, len) = self.check_transfer(r)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if atomic {
            if !r.lba.is_multiple_of(ATOMIC_BLOCKS as u64) {
                return Err(SenseError::invalid_field_in_cdb(2, None).into());
            }
            if !r.blocks.is_multiple_of(ATOMIC_BLOCKS) || len > self.dev.atomic_max() as u64 {
                return Err(SenseError::invalid_field_in_cdb(12, None).into());
            }
        }
        let payload = Self::block_payload(data, len)?;
        let fua = self.durable(fua);
        let _g = self.io.read().await;
        let done = if atomic {
            self.dev.write_atomic(off, payload, fua).await
        } else {
            self.dev.write(off, payload, fua).await
        };
        done.map_err(dev_err)?;
        Ok(Vec::new())
    }

    /// A write is durable when acknowledged with FUA, or always when the
    /// caching mode page turned the write cache off (WCE=0).
    fn durable(&self, fua: bool) -> bool {
        fua || !self.state.lock().modes.wce
    }

    pub(super) async fn verify(&self, r: Range, bytchk: bool, data: &[u8]) -> Outcome {
        let (off, len) = self.check_transfer(r)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let want = if bytchk { Some(Self::block_payload(data, len)?) } else { None };
        let mut buf = vec![0u8; len as usize];
        self.dev.read(off, &mut buf).await.map_err(dev_err)?;
        if let Some(want) = want
            && let Some(at) = first_difference(&buf, want)
        {
            return Err(SenseError::miscompare(at as u64).into());
        }
        Ok(Vec::new())
    }

    /// PRE-FETCH: read the range (to the end of the LU when its length is
    /// 0) into the store's data cache, as much of it as fits, so that
    /// later reads of it need no disk I/O. Status GOOD, never CONDITION
    /// MET: the cache makes no promise to keep the blocks. With IMMED the
    /// status goes back once the CDB is checked and the reads go on in the
    /// background; without, a block that fails its checksum fails the
    /// command, as a read would.
    pub(super) async fn pre_fetch(&self, r: Range, immed: bool) -> Outcome {
        let (off, len) = self.check_range(r)?;
        let len = if r.blocks == 0 { self.blocks() * B - off } else { len };
        if immed {
            let dev = self.dev.clone();
            tokio::spawn(async move {
                if let Err(e) = dev.prefetch(off, len).await {
                    tracing::debug!("PRE-FETCH of {len} bytes at {off}: {e}");
                }
            });
            return Ok(Vec::new());
        }
        self.dev.prefetch(off, len).await.map_err(dev_err)?;
        Ok(Vec::new())
    }

    pub(super) async fn sync_cache(&self, r: Range) -> Outcome {
        self.check_range(r)?;
        self.dev.flush().await.map_err(dev_err)?;
        Ok(Vec::new())
    }

    pub(super) async fn unmap(&self, anchor: bool, param_len: u16, data: &[u8]) -> Outcome {
        if anchor {
            return Err(SenseError::invalid_field_in_cdb(1, Some(0)).into());
        }
        if param_len == 0 {
            return Ok(Vec::new());
        }
        if param_len < 8 {
            return Err(SenseError::param_list_length().into());
        }
        self.check_writable()?;
        let p = Self::payload(data, param_len as u64)?;
        let data_len = u16::from_be_bytes([p[0], p[1]]) as usize;
        let bd_len = u16::from_be_bytes([p[2], p[3]]) as usize;
        if data_len + 2 > p.len() || bd_len + 8 > p.len() {
            return Err(SenseError::param_list_length().into());
        }
        let count = bd_len / 16;
        if count as u32 > MAX_UNMAP_DESCRIPTORS {
            return Err(SenseError::invalid_field_in_param(2, None).into());
        }
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let d = &p[8 + 16 * i..8 + 16 * (i + 1)];
            let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
            let blocks = u32::from_be_bytes(d[8..12].try_into().unwrap_or_default());
            let (off, len) = self.check_range(Range { lba, blocks })?;
            if blocks > MAX_UNMAP_BLOCKS {
                return Err(SenseError::invalid_field_in_param((16 * i + 16) as u16, None).into());
            }
            ranges.push((off, len));
        }
        let _g = self.io.read().await;
        for (off, len) in ranges {
            if len > 0 {
                self.dev.discard(off, len).await.map_err(dev_err)?;
            }
        }
        Ok(Vec::new())
    }

    pub(super) async fn write_same(&self, r: Range, unmap: bool, ndob: bool, size: Size, data: &[u8]) -> Outcome {
        // NUMBER OF LOGICAL BLOCKS 0: to the end of the medium (SBC-4
        // 5.50), bounded by the MAXIMUM WRITE SAME LENGTH.
        let blocks = if r.blocks == 0 { self.blocks().saturating_sub(r.lba) } else { r.blocks as u64 };
        if r.lba > self.blocks() || r.lba.checked_add(blocks).is_none_or(|e| e > self.blocks()) {
            return Err(SenseError::lba_out_of_range().into());
        }
        if blocks > MAX_WRITE_SAME_BLOCKS {
            let byte = if size == Size::S10 { 7 } else { 10 };
            return Err(SenseError::invalid_field_in_cdb(byte, None).into());
        }
        self.check_writable()?;
        let zero = [0u8; BLOCK as usize];
        let block: &[u8] = if ndob {
            &zero
        } else {
            if data.len() != BLOCK as usize {
                return Err(SenseError::param_list_length().into());
            }
            data
        };
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let (off, len) = (r.lba * B, blocks * B);
        let fua = !self.state.lock().modes.wce;
        let _g = self.io.read().await;
        if unmap || block.iter().all(|&b| b == 0) {
            // UNMAP set: deallocate whatever the data block holds (LBPRZ=1:
            // the blocks then read as zeros, which is what initiators such
            // as libiscsi's conformance suite expect). Zeros without UNMAP:
            // deallocating is how a thin LU stores them.
            self.dev.write_zeroes(off, len, fua).await.map_err(dev_err)?;
            return Ok(Vec::new());
        }
        let pattern: Vec<u8> = block.iter().copied().cycle().take(CHUNK.min(len) as usize).collect();
        let mut at = off;
        while at < off + len {
            let n = CHUNK.min(off + len - at);
            self.dev.write(at, &pattern[..n as usize], fua).await.map_err(dev_err)?;
            at += n;
        }
        Ok(Vec::new())
    }

    pub(super) async fn get_lba_status(&self, lba: u64, alloc: u32) -> Outcome {
        if lba >= self.blocks() {
            return Err(SenseError::lba_out_of_range().into());
        }
        let max_desc = (alloc.saturating_sub(8) / 16).clamp(1, LBA_STATUS_MAX_DESCRIPTORS) as usize;
        // (first LBA, blocks, allocated), merged across the windows the
        // allocation map is asked about.
        let mut descs: Vec<(u64, u64, bool)> = Vec::new();
        let mut off = lba * B;
        let size = self.dev.size();
        // A descriptor may end before the medium does (SBC-4 5.7): stop after
        // LBA_STATUS_SCAN bytes so one command stays bounded on huge LUNs.
        let stop = off.saturating_add(LBA_STATUS_SCAN).min(size);
        while off < stop && descs.len() <= max_desc {
            let len = (stop - off).min(LBA_STATUS_WINDOW);
            for e in self.dev.allocation(off, len).await.map_err(dev_err)? {
                if e.length == 0 {
                    continue;
                }
                match descs.last_mut() {
                    Some(d) if d.2 == e.allocated && d.1 + e.length / B <= u32::MAX as u64 => d.1 += e.length / B,
                    _ => descs.push((e.offset / B, e.length / B, e.allocated)),
                }
            }
            off += len;
        }
        let mut out = vec![0u8; 8];
        for (first, blocks, allocated) in descs.into_iter().take(max_desc) {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&first.to_be_bytes());
            d[8..12].copy_from_slice(&(blocks as u32).to_be_bytes());
            d[12] = if allocated { 0 } else { 1 }; // mapped, deallocated
            out.extend_from_slice(&d);
        }
        let plen = (out.len() - 4) as u32;
        out[0..4].copy_from_slice(&plen.to_be_bytes());
        Ok(truncate(out, alloc))
    }

    pub(super) async fn compare_and_write(&self, r: Range, fua: bool, data: &[u8]) -> Outcome {
        if r.blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
            return Err(SenseError::invalid_field_in_cdb(13, None).into());
        }
        let (off, len) = self.check_range(r)?;
        self.check_writable()?;
        if len == 0 {
            // Zero blocks transfers nothing; data sent anyway means the
            // initiator meant a length the one-byte field cannot hold.
            if !data.is_empty() {
                return Err(SenseError::invalid_field_in_cdb(13, None).into());
            }
            return Ok(Vec::new());
        }
        if data.len() as u64 != 2 * len {
            return Err(SenseError::param_list_length().into());
        }
        let (verify, write) = data.split_at(len as usize);
        let fua = self.durable(fua);
        let _g = self.io.write().await;
        let mut cur = vec![0u8; len as usize];
        self.dev.read(off, &mut cur).await.map_err(dev_err)?;
        if let Some(at) = first_difference(&cur, verify) {
            return Err(SenseError::miscompare(at as u64).into());
        }
        self.dev.write(off, write, fua).await.map_err(dev_err)?;
        Ok(Vec::new())
    }

    pub(super) async fn orwrite(&self, r: Range, fua: bool, data: &[u8]) -> Outcome {
        let (off, len) = self.check_transfer(r)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let payload = Self::block_payload(data, len)?;
        let fua = self.durable(fua);
        let _g = self.io.write().await;
        let mut cur = vec![0u8; len as usize];
        self.dev.read(off, &mut cur).await.map_err(dev_err)?;
        for (c, p) in cur.iter_mut().zip(payload) {
            *c |= p;
        }
        self.dev.write(off, &cur, fua).await.map_err(dev_err)?;
        Ok(Vec::new())
    }

    /// SANITIZE: OVERWRITE writes the pattern over the whole LU once (an
    /// all-zero pattern deallocates instead), BLOCK ERASE deallocates
    /// everything; CRYPTO ERASE and EXIT FAILURE MODE are not supported.
    /// IMMED and AUSE are accepted and have no effect: the sanitize is
    /// complete when the command returns, and it has no failure mode to exit.
    pub(super) async fn sanitize(&self, action: u8, param_len: u16, data: &[u8]) -> Outcome {
        const OVERWRITE: u8 = 0x01;
        const BLOCK_ERASE: u8 = 0x02;
        match action {
            OVERWRITE => {
                // Parameter list: byte 0 INVERT/TEST/OVERWRITE COUNT, bytes
                // 2-3 pattern length, then the pattern (SBC-4 5.30.3). Every
                // error is reported against the CDB, as libiscsi expects.
                let bad = || SenseError::invalid_field_in_cdb(7, None);
                if param_len < 5 || param_len as u32 > BLOCK + 4 {
                    return Err(bad().into());
                }
                let p = Self::payload(data, param_len as u64)?;
                let count = p[0] & 0x1F;
                let plen = u16::from_be_bytes([p[2], p[3]]) as usize;
                if count == 0 || p[0] & 0x60 != 0 || plen == 0 || plen > BLOCK as usize || plen + 4 > p.len() {
                    return Err(bad().into());
                }
                self.check_writable()?;
                self.erase_all(Some(&p[4..4 + plen])).await?;
            }
            BLOCK_ERASE => {
                if param_len != 0 {
                    return Err(SenseError::invalid_field_in_cdb(7, None).into());
                }
                self.check_writable()?;
                self.erase_all(None).await?;
            }
            _ => return Err(SenseError::invalid_field_in_cdb(1, Some(4)).into()),
        }
        Ok(Vec::new())
    }

    async fn erase_all(&self, pattern: Option<&[u8]>) -> Result<(), Fail> {
        let size = self.dev.size();
        let _g = self.io.write().await;
        match pattern {
            Some(p) if p.iter().any(|&b| b != 0) => {
                let block: Vec<u8> = p.iter().copied().cycle().take(BLOCK as usize).collect();
                let buf: Vec<u8> = block.iter().copied().cycle().take(CHUNK.min(size) as usize).collect();
                let mut at = 0;
                while at < size {
                    let n = CHUNK.min(size - at);
                    self.dev.write(at, &buf[..n as usize], false).await.map_err(dev_err)?;
                    at += n;
                }
            }
            _ => {
                if size > 0 {
                    self.dev.discard(0, size).await.map_err(dev_err)?;
                }
            }
        }
        self.dev.flush().await.map_err(dev_err)?;
        Ok(())
    }
}
