//! OVA files: the single-file form of an OVF package, as VirtualBox, VMware
//! and most other hypervisors export and import virtual machines.
//!
//! # Format
//!
//! An OVA is a tar archive (POSIX ustar) holding, in this order:
//!
//! ```text
//! NAME.ovf          the OVF descriptor: XML naming the VM's hardware and
//!                   its disks, each disk pointing at a file of the package
//! NAME.mf           optional manifest: one `SHA256(FILE)= HEX` line (or
//!                   SHA1, SHA512) per other file of the package
//! NAME.cert         optional certificate (signature of the manifest)
//! NAME-disk0.vmdk   the disk images, here streamOptimized VMDK
//! ...
//! ```
//!
//! This module is pure: it writes and reads descriptors ([`ovf_xml`],
//! [`parse_ovf`]) and archives ([`write_ova`], [`read_ova`]); converting
//! disks to and from VMDK (`qemu-img convert`) happens elsewhere.
//!
//! # Compatibility
//!
//! The descriptor is OVF 1.0 with the hardware family `vmx-07`, one LSI
//! Logic SCSI controller per 15 disks and an E1000 adapter on a network
//! named `NAT`, which both VMware (ovftool, Workstation, ESXi) and
//! VirtualBox import. [`parse_ovf`] reads OVF 1.x and 2.x descriptors from
//! either, and from this module.
//!
//! The archive is ustar with plain names of at most 99 bytes. A file of
//! 8 GiB or more has its size written in the base-256 form of GNU tar
//! (ustar's octal field stops at 8 GiB - 1; the alternative, a pax header,
//! is what some OVA readers do not understand); GNU tar, bsdtar and
//! VirtualBox's reader take it. The reader also takes GNU long names and pax
//! headers, but only regular files with plain names: it refuses absolute
//! paths, `..`, directories, links, devices and sparse files, never
//! overwrites a file, and reads archive metadata with size limits, so an
//! untrusted OVA cannot write outside the directory it is unpacked into nor
//! exhaust memory.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use roxmltree::Node;
use sha2::Digest;

/// OVF 1.x envelope namespace.
const OVF1_NS: &str = "http://schemas.dmtf.org/ovf/envelope/1";
/// OVF 2.x envelope namespace.
const OVF2_NS: &str = "http://schemas.dmtf.org/ovf/envelope/2";
/// CIM resource allocation settings (hardware items) namespace.
const RASD_NS: &str = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
/// CIM virtual system settings namespace.
const VSSD_NS: &str = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";
/// `ovf:format` of a streamOptimized VMDK.
const VMDK_STREAM: &str = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";
/// Disks per SCSI controller (16 targets less the controller's own, 7).
const DISKS_PER_CONTROLLER: usize = 15;

/// Tar block size.
const BLOCK: usize = 512;
/// Longest name [`write_ova`] stores (ustar's name field, NUL-terminated).
const MAX_NAME: usize = 99;
/// Largest descriptor [`read_ova`] accepts.
const MAX_DESCRIPTOR: u64 = 16 << 20;
/// Largest manifest [`read_ova`] accepts.
const MAX_MANIFEST: u64 = 1 << 20;
/// Largest pax or GNU long-name record [`read_ova`] accepts.
const MAX_META: u64 = 64 << 10;
/// Copy buffer.
const COPY_BUF: usize = 1 << 20;

/// OVA and OVF failures.
#[derive(Debug, thiserror::Error)]
pub enum OvaError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file system being written to is full.
    #[error("{0}: the disk is full; free space or choose another destination")]
    NoSpace(PathBuf),
    /// The descriptor is not well-formed XML.
    #[error("the OVF descriptor is not well-formed XML: {0}")]
    Xml(String),
    /// The descriptor is XML, but lacks something Keel needs or says
    /// something Keel cannot import.
    #[error("OVF descriptor: {0}")]
    Ovf(String),
    /// The descriptor uses an allocation unit this reader does not know.
    #[error(
        "OVF descriptor: unknown allocation unit {unit:?} in {context}; known are forms like \"byte\", \
         \"byte * 2^20\", \"MegaBytes\" and \"GB\""
    )]
    UnknownUnit {
        /// The unit as written.
        unit: String,
        /// Where it was (`disk vmdisk1`, `memory`).
        context: String,
    },
    /// A name cannot be stored in an OVA.
    #[error("cannot put {name:?} in an OVA: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why not.
        reason: String,
    },
    /// The file is not a tar archive, or is damaged or truncated.
    #[error("{path} is not a valid OVA: {detail}")]
    Archive {
        /// The OVA.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A disk image of the OVA is not a self-contained sparse VMDK: it
    /// could make the reader open other files (a descriptor's extents, a
    /// parent, a backing file), so it is not read.
    #[error("disk {file:?} of the OVA is refused: {reason}")]
    UnsafeDisk {
        /// The image's name in the OVA.
        file: String,
        /// Why it was refused.
        reason: String,
    },
    /// An archive entry was refused as unsafe or not belonging in an OVA.
    #[error("{path}: refusing entry {name:?}: {reason}")]
    UnsafeEntry {
        /// The OVA.
        path: PathBuf,
        /// The entry's name as stored.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// The archive holds no `.ovf` descriptor.
    #[error("{0} holds no .ovf descriptor; is it an OVA?")]
    NoDescriptor(PathBuf),
    /// The manifest is malformed, or does not match the archive's files.
    #[error("{path}: manifest {manifest}: {detail}")]
    Manifest {
        /// The OVA.
        path: PathBuf,
        /// The manifest's name.
        manifest: String,
        /// What is wrong.
        detail: String,
    },
    /// A file's digest differs from the manifest's.
    #[error(
        "{path}: {file} does not match the manifest ({algorithm} is {actual}, the manifest says {expected}); \
         the OVA is damaged or was altered"
    )]
    Digest {
        /// The OVA.
        path: PathBuf,
        /// The file.
        file: String,
        /// `SHA1`, `SHA256` or `SHA512`.
        algorithm: &'static str,
        /// The manifest's digest (hex).
        expected: String,
        /// The file's digest (hex).
        actual: String,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> OvaError + '_ {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            OvaError::NoSpace(path.to_path_buf())
        } else {
            OvaError::Io { path: path.to_path_buf(), source }
        }
    }
}

/// One disk of an OVF package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfDisk {
    /// The disk image's file name inside the OVA (`web-disk0.vmdk`): a plain
    /// name, never a path.
    pub file: String,
    /// The virtual disk's size in bytes.
    pub capacity_bytes: u64,
    /// The image file's size in bytes (`ovf:size`); 0 when the descriptor
    /// does not say (VirtualBox omits it), and then left out when writing.
    pub file_bytes: u64,
}

/// The virtual machine an OVF package describes, as far as Keel uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfSystem {
    /// The VM's name.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Disks in order, the boot disk first.
    pub disks: Vec<OvfDisk>,
}

/// Escapes `s` for XML text and attribute values. Characters XML 1.0 cannot
/// hold at all (most control characters) become U+FFFD.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The OVF 1.0 descriptor of `sys`: an `Envelope` with `References` (disk
/// `i` is file `file{i+1}`), a `DiskSection` (disk `vmdisk{i+1}`,
/// streamOptimized VMDK, capacity in bytes), a `NetworkSection` with one
/// network `NAT`, and a `VirtualSystem` named `sys.name` (guest OS id 101,
/// Linux 64-bit; hardware family `vmx-07`) with its CPUs, memory, LSI Logic
/// SCSI controllers, the disks in order and an E1000 adapter on `NAT`.
/// Rasd elements are in schema (alphabetical) order, as VMware's validator
/// requires.
pub fn ovf_xml(sys: &OvfSystem) -> String {
    let mut out = String::with_capacity(4096 + 1024 * sys.disks.len());
    write_ovf(&mut out, sys).expect("formatting into a String does not fail");
    out
}

fn write_ovf(o: &mut String, sys: &OvfSystem) -> std::fmt::Result {
    let name = esc(&sys.name);
    writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#)?;
    writeln!(o, r#"<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="{OVF1_NS}" xmlns:ovf="{OVF1_NS}""#)?;
    writeln!(o, r#"    xmlns:rasd="{RASD_NS}""#)?;
    writeln!(o, r#"    xmlns:vssd="{VSSD_NS}""#)?;
    writeln!(o, r#"    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#)?;
    writeln!(o, "  <References>")?;
    for (i, d) in sys.disks.iter().enumerate() {
        let size = if d.file_bytes > 0 { format!(r#" ovf:size="{}""#, d.file_bytes) } else { String::new() };
        writeln!(o, r#"    <File ovf:href="{}" ovf:id="file{}"{size}/>"#, esc(&d.file), i + 1)?;
    }
    writeln!(o, "  </References>")?;
    writeln!(o, "  <DiskSection>")?;
    writeln!(o, "    <Info>List of the virtual disks used in the package</Info>")?;
    for (i, d) in sys.disks.iter().enumerate() {
        let n = i + 1;
        write!(o, r#"    <Disk ovf:capacity="{}" ovf:capacityAllocationUnits="byte""#, d.capacity_bytes)?;
        writeln!(o, r#" ovf:diskId="vmdisk{n}" ovf:fileRef="file{n}" ovf:format="{VMDK_STREAM}"/>"#)?;
    }
    writeln!(o, "  </DiskSection>")?;
    writeln!(o, "  <NetworkSection>")?;
    writeln!(o, "    <Info>Logical networks used in the package</Info>")?;
    writeln!(o, r#"    <Network ovf:name="NAT">"#)?;
    writeln!(o, "      <Description>Logical network used by this appliance.</Description>")?;
    writeln!(o, "    </Network>")?;
    writeln!(o, "  </NetworkSection>")?;
    writeln!(o, r#"  <VirtualSystem ovf:id="{name}">"#)?;
    writeln!(o, "    <Info>A virtual machine</Info>")?;
    writeln!(o, "    <Name>{name}</Name>")?;
    writeln!(o, r#"    <OperatingSystemSection ovf:id="101">"#)?;
    writeln!(o, "      <Info>The kind of installed guest operating system</Info>")?;
    writeln!(o, "      <Description>Linux 64-bit</Description>")?;
    writeln!(o, "    </OperatingSystemSection>")?;
    writeln!(o, "    <VirtualHardwareSection>")?;
    writeln!(o, "      <Info>Virtual hardware requirements for a virtual machine</Info>")?;
    writeln!(o, "      <System>")?;
    writeln!(o, "        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>")?;
    writeln!(o, "        <vssd:InstanceID>0</vssd:InstanceID>")?;
    writeln!(o, "        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>")?;
    writeln!(o, "        <vssd:VirtualSystemType>vmx-07</vssd:VirtualSystemType>")?;
    writeln!(o, "      </System>")?;

    let item = |o: &mut String, fields: &[(&str, String)]| -> std::fmt::Result {
        writeln!(o, "      <Item>")?;
        for (k, v) in fields {
            writeln!(o, "        <rasd:{k}>{}</rasd:{k}>", esc(v))?;
        }
        writeln!(o, "      </Item>")
    };
    let cpus = format!("{} virtual CPU", sys.cpus);
    item(
        o,
        &[
            ("AllocationUnits", "hertz * 10^6".into()),
            ("Caption", cpus.clone()),
            ("Description", "Number of virtual CPUs".into()),
            ("ElementName", cpus),
            ("InstanceID", "1".into()),
            ("ResourceType", "3".into()),
            ("VirtualQuantity", sys.cpus.to_string()),
        ],
    )?;
    // Whole MiB as everyone writes it; bytes in the odd case it is not.
    let (unit, quantity, caption) = if sys.memory_bytes.is_multiple_of(1 << 20) {
        let mib = sys.memory_bytes >> 20;
        ("byte * 2^20", mib, format!("{mib} MB of memory"))
    } else {
        ("byte", sys.memory_bytes, format!("{} bytes of memory", sys.memory_bytes))
    };
    item(
        o,
        &[
            ("AllocationUnits", unit.into()),
            ("Caption", caption.clone()),
            ("Description", "Memory Size".into()),
            ("ElementName", caption),
            ("InstanceID", "2".into()),
            ("ResourceType", "4".into()),
            ("VirtualQuantity", quantity.to_string()),
        ],
    )?;
    let controllers = sys.disks.len().div_ceil(DISKS_PER_CONTROLLER).max(1);
    for c in 0..controllers {
        item(
            o,
            &[
                ("Address", c.to_string()),
                ("Caption", format!("scsiController{c}")),
                ("Description", "SCSI Controller".into()),
                ("ElementName", format!("scsiController{c}")),
                ("InstanceID", (3 + c).to_string()),
                ("ResourceSubType", "lsilogic".into()),
                ("ResourceType", "6".into()),
            ],
        )?;
    }
    let mut id = 3 + controllers;
    for (i, _) in sys.disks.iter().enumerate() {
        let slot = i % DISKS_PER_CONTROLLER;
        // Target 7 is the controller's own.
        let unit = if slot < 7 { slot } else { slot + 1 };
        item(
            o,
            &[
                ("AddressOnParent", unit.to_string()),
                ("Caption", format!("disk{}", i + 1)),
                ("Description", "Disk Image".into()),
                ("ElementName", format!("disk{}", i + 1)),
                ("HostResource", format!("ovf:/disk/vmdisk{}", i + 1)),
                ("InstanceID", id.to_string()),
                ("Parent", (3 + i / DISKS_PER_CONTROLLER).to_string()),
                ("ResourceType", "17".into()),
            ],
        )?;
        id += 1;
    }
    item(
        o,
        &[
            ("AddressOnParent", "7".into()),
            ("AutomaticAllocation", "true".into()),
            ("Caption", "Ethernet adapter on 'NAT'".into()),
            ("Connection", "NAT".into()),
            ("ElementName", "Ethernet adapter on 'NAT'".into()),
            ("InstanceID", id.to_string()),
            ("ResourceSubType", "E1000".into()),
            ("ResourceType", "10".into()),
        ],
    )?;
    writeln!(o, "    </VirtualHardwareSection>")?;
    writeln!(o, "  </VirtualSystem>")?;
    writeln!(o, "</Envelope>")
}

fn ovf(msg: impl Into<String>) -> OvaError {
    OvaError::Ovf(msg.into())
}

/// An OVF attribute of `n` (`ovf:NAME`, or `NAME` without a namespace).
fn attr<'a>(n: Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.attributes()
        .find(|a| a.name() == name && a.namespace().is_none_or(|ns| ns == OVF1_NS || ns == OVF2_NS))
        .map(|a| a.value())
}

fn children<'a, 'i>(n: Node<'a, 'i>, local: &'static str) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(move |c| c.is_element() && c.tag_name().name() == local)
}

/// The trimmed text of `n`'s first child element named `local` (any
/// namespace: `rasd:`, `sasd:`, `vssd:`...).
fn child_text<'a>(n: Node<'a, '_>, local: &'static str) -> Option<&'a str> {
    children(n, local).next().and_then(|c| c.text()).map(str::trim).filter(|t| !t.is_empty())
}

/// Bytes per unit of a DMTF programmatic unit (`byte`, `byte * 2^20`,
/// `byte * 10^9`, `byte * 1024`) or a common name (`MegaBytes`, `MB`,
/// `MiB`...; the decimal-looking names mean powers of 1024, as VMware and
/// VirtualBox use them).
fn unit_bytes(unit: &str, context: &str) -> Result<u64, OvaError> {
    let unknown = || OvaError::UnknownUnit { unit: unit.to_string(), context: context.to_string() };
    let norm: String = unit.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
    let named = match norm.as_str() {
        "b" => Some(0),
        "kb" | "kib" | "kilobyte" | "kilobytes" => Some(10),
        "mb" | "mib" | "megabyte" | "megabytes" => Some(20),
        "gb" | "gib" | "gigabyte" | "gigabytes" => Some(30),
        "tb" | "tib" | "terabyte" | "terabytes" => Some(40),
        _ => None,
    };
    if let Some(shift) = named {
        return Ok(1 << shift);
    }
    let rest = norm.strip_prefix("bytes").or_else(|| norm.strip_prefix("byte")).ok_or_else(unknown)?;
    let mut bytes: u64 = 1;
    if rest.is_empty() {
        return Ok(1);
    }
    let rest = rest.strip_prefix('*').ok_or_else(unknown)?;
    for factor in rest.split('*') {
        let value = match factor.split_once('^') {
            Some((base, exp)) => {
                let base: u64 = base.parse().map_err(|_| unknown())?;
                let exp: u32 = exp.parse().map_err(|_| unknown())?;
                base.checked_pow(exp).ok_or_else(unknown)?
            }
            None => factor.parse().map_err(|_| unknown())?,
        };
        bytes = bytes.checked_mul(value).filter(|&b| b > 0).ok_or_else(unknown)?;
    }
    Ok(bytes)
}

fn number(text: &str, what: &str) -> Result<u64, OvaError> {
    text.trim()
        .parse()
        .map_err(|_| ovf(format!("{what} is {text:?}, not a whole number (property references are not supported)")))
}

fn times(quantity: u64, unit: u64, what: &str) -> Result<u64, OvaError> {
    quantity.checked_mul(unit).ok_or_else(|| ovf(format!("{what} is too large")))
}

/// Reads an OVF descriptor: the one [`ovf_xml`] writes, and those of
/// VirtualBox, VMware and other OVF 1.x/2.x writers.
///
/// The VM is the package's one `VirtualSystem` (a collection of several is
/// refused); its name is its `Name`, else the `VirtualSystemIdentifier`,
/// else its `ovf:id`. From the first `VirtualHardwareSection` (items of a
/// non-default deployment option skipped) it takes the CPU count
/// (ResourceType 3), the memory (ResourceType 4; `AllocationUnits` such as
/// `byte * 2^20` or `MegaBytes`, MiB when absent) and the disks
/// (ResourceType 17) in the order of their items, each resolved through its
/// `HostResource` (`ovf:/disk/ID`) to the `DiskSection` for its capacity
/// (`ovf:capacity` times `ovf:capacityAllocationUnits`) and through its
/// `ovf:fileRef` to `References` for its file; disks of the `DiskSection` no
/// item attaches follow in section order. File names must be plain names
/// inside the OVA (no URLs or paths), uncompressed and unsplit.
pub fn parse_ovf(xml: &str) -> Result<OvfSystem, OvaError> {
    let xml = xml.strip_prefix('\u{feff}').unwrap_or(xml);
    let doc = roxmltree::Document::parse(xml).map_err(|e| OvaError::Xml(e.to_string()))?;
    let env = doc.root_element();
    if env.tag_name().name() != "Envelope" {
        return Err(ovf(format!("the root element is <{}>, not an OVF <Envelope>", env.tag_name().name())));
    }

    // References: file id -> (href, size).
    let mut files: HashMap<&str, (&str, u64)> = HashMap::new();
    for refs in children(env, "References") {
        for f in children(refs, "File") {
            let id = attr(f, "id").ok_or_else(|| ovf("a References/File has no ovf:id"))?;
            let href = attr(f, "href").ok_or_else(|| ovf(format!("file {id} has no ovf:href")))?;
            if let Err(reason) = plain_name(href.as_bytes())
                .and_then(|n| if n.is_empty() { Err("it is empty".to_string()) } else { Ok(()) })
            {
                return Err(ovf(format!(
                    "file {id}'s ovf:href {href:?} is not a plain file name inside the OVA ({reason}); external \
                     files are not supported"
                )));
            }
            if let Some(c) = attr(f, "compression").filter(|c| !c.is_empty() && *c != "identity") {
                return Err(ovf(format!("file {href} is {c}-compressed; compressed files are not supported")));
            }
            if attr(f, "chunkSize").is_some() {
                return Err(ovf(format!("file {href} is split into chunks; chunked files are not supported")));
            }
            let size = attr(f, "size").map(|s| number(s, &format!("file {href}'s ovf:size"))).transpose()?.unwrap_or(0);
            if files.insert(id, (href, size)).is_some() {
                return Err(ovf(format!("two files have the ovf:id {id}")));
            }
        }
    }

    // DiskSection: disk id -> disk, plus section order.
    let section =
        children(env, "DiskSection").next().ok_or_else(|| ovf("there is no DiskSection, so no disks to import"))?;
    let mut disks: HashMap<&str, OvfDisk> = HashMap::new();
    let mut disk_order = Vec::new();
    for d in children(section, "Disk") {
        let id = attr(d, "diskId").ok_or_else(|| ovf("a DiskSection/Disk has no ovf:diskId"))?;
        let file_ref = attr(d, "fileRef")
            .filter(|f| !f.is_empty())
            .ok_or_else(|| ovf(format!("disk {id} has no file (no ovf:fileRef); blank disks are not supported")))?;
        let &(href, file_bytes) = files
            .get(file_ref)
            .ok_or_else(|| ovf(format!("disk {id} refers to file {file_ref}, which References does not list")))?;
        let capacity = attr(d, "capacity").ok_or_else(|| ovf(format!("disk {id} has no ovf:capacity")))?;
        let capacity = number(capacity, &format!("disk {id}'s ovf:capacity"))?;
        let unit = match attr(d, "capacityAllocationUnits") {
            Some(u) => unit_bytes(u, &format!("disk {id}'s ovf:capacityAllocationUnits"))?,
            None => 1,
        };
        let capacity_bytes = times(capacity, unit, &format!("disk {id}'s capacity"))?;
        let disk = OvfDisk { file: href.to_string(), capacity_bytes, file_bytes };
        if disks.insert(id, disk).is_some() {
            return Err(ovf(format!("two disks have the ovf:diskId {id}")));
        }
        disk_order.push(id);
    }

    let systems: Vec<Node> =
        env.descendants().filter(|n| n.is_element() && n.tag_name().name() == "VirtualSystem").collect();
    let vs = match systems.as_slice() {
        [] => return Err(ovf("there is no VirtualSystem")),
        [vs] => *vs,
        many => {
            return Err(ovf(format!("the package holds {} virtual systems; Keel imports one VM per OVA", many.len())));
        }
    };
    let hw = children(vs, "VirtualHardwareSection")
        .next()
        .ok_or_else(|| ovf("the VirtualSystem has no VirtualHardwareSection"))?;
    let name = child_text(vs, "Name")
        .or_else(|| children(hw, "System").next().and_then(|s| child_text(s, "VirtualSystemIdentifier")))
        .or_else(|| attr(vs, "id").map(str::trim).filter(|s| !s.is_empty()))
        .ok_or_else(|| ovf("the VirtualSystem has no name (no Name, VirtualSystemIdentifier or ovf:id)"))?;

    // Deployment options: items tagged with configurations count only when
    // they include the default one.
    let default_config = children(env, "DeploymentOptionSection")
        .flat_map(|d| children(d, "Configuration"))
        .fold(None, |found: Option<(&str, bool)>, c| {
            let id = attr(c, "id").unwrap_or("");
            let is_default = attr(c, "default").is_some_and(|d| d == "true" || d == "1");
            match found {
                Some((_, true)) => found,
                Some(_) if !is_default => found,
                _ => Some((id, is_default)),
            }
        })
        .map(|(id, _)| id);

    let mut cpus = None;
    let mut memory = None;
    let mut ordered = Vec::new();
    for item in hw.children().filter(|n| n.is_element() && n.tag_name().name().ends_with("Item")) {
        if let Some(configs) = attr(item, "configuration")
            && !default_config.is_some_and(|d| configs.split_whitespace().any(|c| c == d))
        {
            continue;
        }
        let Some(kind) = child_text(item, "ResourceType") else { continue };
        match kind {
            "3" => {
                let q =
                    child_text(item, "VirtualQuantity").ok_or_else(|| ovf("the CPU item has no VirtualQuantity"))?;
                let n: u32 = q.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    ovf(format!("the CPU item's VirtualQuantity is {q:?}, not a positive whole number"))
                })?;
                if cpus.replace(n).is_some() {
                    return Err(ovf("there are two CPU items (ResourceType 3)"));
                }
            }
            "4" => {
                let q =
                    child_text(item, "VirtualQuantity").ok_or_else(|| ovf("the memory item has no VirtualQuantity"))?;
                let q = number(q, "the memory item's VirtualQuantity")?;
                let unit =
                    match child_text(item, "AllocationUnits").or_else(|| child_text(item, "VirtualQuantityUnits")) {
                        Some(u) => unit_bytes(u, "the memory item")?,
                        // Writers always state it; old ones meant MiB.
                        None => 1 << 20,
                    };
                if memory.replace(times(q, unit, "the memory size")?).is_some() {
                    return Err(ovf("there are two memory items (ResourceType 4)"));
                }
            }
            "17" => {
                let Some(host) = child_text(item, "HostResource") else { continue };
                let id = host
                    .strip_prefix("ovf:/disk/")
                    .or_else(|| host.strip_prefix("ovf://disk/"))
                    .or_else(|| host.strip_prefix("/disk/"))
                    .ok_or_else(|| {
                        ovf(format!(
                            "a disk item's HostResource is {host:?}; only DiskSection disks (ovf:/disk/ID) are \
                             supported"
                        ))
                    })?;
                if !disks.contains_key(id) {
                    return Err(ovf(format!("a disk item refers to disk {id}, which the DiskSection does not list")));
                }
                if ordered.contains(&id) {
                    return Err(ovf(format!("disk {id} is attached twice")));
                }
                ordered.push(id);
            }
            _ => {}
        }
    }
    let cpus = cpus.ok_or_else(|| ovf("the VirtualHardwareSection has no CPU item (ResourceType 3)"))?;
    let memory_bytes = memory.ok_or_else(|| ovf("the VirtualHardwareSection has no memory item (ResourceType 4)"))?;
    for id in disk_order {
        if !ordered.contains(&id) {
            ordered.push(id);
        }
    }
    let disks = ordered.into_iter().map(|id| disks.remove(id).expect("listed above")).collect();
    Ok(OvfSystem { name: name.to_string(), cpus, memory_bytes, disks })
}

/// The plain file name a tar entry or href `raw` stands for, after leading
/// `./`; `""` for `.` itself. The error says why it is not one.
fn plain_name(raw: &[u8]) -> Result<String, String> {
    if raw.first() == Some(&b'/') {
        return Err("it is an absolute path".into());
    }
    let mut name = raw;
    while let Some(rest) = name.strip_prefix(b"./") {
        name = rest;
    }
    if name == b"." {
        name = b"";
    }
    let name = std::str::from_utf8(name).map_err(|_| "the name is not UTF-8".to_string())?;
    if name.split(['/', '\\']).any(|c| c == "..") {
        return Err("it contains '..'".into());
    }
    if name.contains(['/', '\\']) {
        return Err("it is not a plain file name (it has a directory part)".into());
    }
    if name.contains('\0') {
        return Err("it contains a NUL byte".into());
    }
    Ok(name.to_string())
}

/// Checks a name [`write_ova`] is to store.
fn check_name(name: &str) -> Result<(), OvaError> {
    let bad = |reason: &str| Err(OvaError::BadName { name: name.to_string(), reason: reason.to_string() });
    if name.is_empty() || name == "." || name == ".." {
        return bad("not a file name");
    }
    if name.len() > MAX_NAME {
        return bad("longer than 99 bytes, the limit of a ustar name");
    }
    if name.contains(['/', '\\', '\0']) {
        return bad("only plain file names (no '/', '\\' or NUL) go in an OVA");
    }
    Ok(())
}

fn has_ext(name: &str, ext: &str) -> bool {
    name.len() > ext.len()
        && name.is_char_boundary(name.len() - ext.len())
        && name[name.len() - ext.len()..].eq_ignore_ascii_case(ext)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Writes `value` as a NUL-terminated octal number filling `field`.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    debug_assert_eq!(s.len(), digits, "value too large for the field");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

/// Writes a size: octal when it fits (under 8 GiB), else GNU base-256.
fn put_size(field: &mut [u8; 12], size: u64) {
    if size < 1 << 33 {
        put_octal(field, size);
    } else {
        *field = [0; 12];
        field[0] = 0x80;
        field[4..].copy_from_slice(&size.to_be_bytes());
    }
}

/// A ustar header for a regular file.
fn ustar_header(name: &str, size: u64, mtime: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], 0o644);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    put_size((&mut h[124..136]).try_into().expect("12 bytes"), size);
    put_octal(&mut h[136..148], mtime.min(0o777_7777_7777));
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_octal(&mut h[329..337], 0);
    put_octal(&mut h[337..345], 0);
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn padding(size: u64) -> usize {
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

/// Writes the OVA `out`: a ustar archive of the descriptor `ovf` as
/// `ovf_name` (which must end in `.ovf`), then each `(name, source)` of
/// `files` in order, its contents streamed from `source`. Names are plain
/// file names of at most 99 bytes, distinct; at most one may end in `.mf`
/// (a manifest, conventionally right after the descriptor), none in `.ovf`.
///
/// The archive is written to a temporary name next to `out`, synced, and
/// renamed over `out`, so `out` is either the old file or the complete new
/// one. A source that changes size while being copied fails the write.
pub fn write_ova(out: &Path, ovf_name: &str, ovf: &str, files: &[(String, PathBuf)]) -> Result<(), OvaError> {
    check_name(ovf_name)?;
    if !has_ext(ovf_name, ".ovf") {
        return Err(OvaError::BadName {
            name: ovf_name.into(),
            reason: "the descriptor's name must end in .ovf".into(),
        });
    }
    let mut seen = HashSet::from([ovf_name]);
    let mut manifests = 0;
    for (name, _) in files {
        check_name(name)?;
        let bad = |reason: &str| Err(OvaError::BadName { name: name.clone(), reason: reason.into() });
        if !seen.insert(name) {
            return bad("the name appears twice");
        }
        if has_ext(name, ".ovf") {
            return bad("an OVA holds one .ovf descriptor, passed separately");
        }
        if has_ext(name, ".mf") {
            manifests += 1;
            if manifests > 1 {
                return bad("an OVA holds at most one .mf manifest");
            }
        }
    }

    let file_name = out.file_name().ok_or_else(|| OvaError::BadName {
        name: out.display().to_string(),
        reason: "the destination is not a file path".into(),
    })?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.{}-{seq}.tmp", file_name.to_string_lossy(), std::process::id()));
    let result = write_archive(&tmp, ovf_name, ovf, files).and_then(|()| {
        std::fs::rename(&tmp, out).map_err(io_err(out))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_archive(tmp: &Path, ovf_name: &str, ovf: &str, files: &[(String, PathBuf)]) -> Result<(), OvaError> {
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(tmp).map_err(io_err(tmp))?;
    let mut w = BufWriter::with_capacity(COPY_BUF, file);
    let zeros = [0u8; BLOCK];
    let ovf_bytes = ovf.as_bytes();
    let now = unix_secs(SystemTime::now());
    (|| {
        w.write_all(&ustar_header(ovf_name, ovf_bytes.len() as u64, now))?;
        w.write_all(ovf_bytes)?;
        w.write_all(&zeros[..padding(ovf_bytes.len() as u64)])
    })()
    .map_err(io_err(tmp))?;

    let mut buf = vec![0u8; COPY_BUF];
    for (name, src) in files {
        let mut f = File::open(src).map_err(io_err(src))?;
        let meta = f.metadata().map_err(io_err(src))?;
        if !meta.is_file() {
            return Err(OvaError::BadName { name: src.display().to_string(), reason: "not a regular file".into() });
        }
        let size = meta.len();
        let mtime = meta.modified().map(unix_secs).unwrap_or(now);
        w.write_all(&ustar_header(name, size, mtime)).map_err(io_err(tmp))?;
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match f.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(OvaError::Io {
                        path: src.clone(),
                        source: io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while being archived"),
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(src)(e)),
            };
            w.write_all(&buf[..n]).map_err(io_err(tmp))?;
            left -= n as u64;
        }
        if f.read(&mut buf[..1]).map_err(io_err(src))? != 0 {
            return Err(OvaError::Io {
                path: src.clone(),
                source: io::Error::other("the file grew while being archived"),
            });
        }
        w.write_all(&zeros[..padding(size)]).map_err(io_err(tmp))?;
    }
    w.write_all(&zeros).and_then(|()| w.write_all(&zeros)).map_err(io_err(tmp))?;
    let file = w.into_inner().map_err(|e| io_err(tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err(tmp))
}

/// Digest algorithms of manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

enum Hasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn hex(self) -> String {
        match self {
            Hasher::Sha1(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// An extracted file: name, path, and the digest computed while copying.
type Extracted = (String, PathBuf, Option<(Algorithm, String)>);

/// One manifest line: file, algorithm, lower-case hex digest.
type ManifestLine = (String, Algorithm, String);

/// Parses `ALG(FILE)= HEX` lines (spaces around the parts tolerated).
fn parse_manifest(text: &str) -> Result<Vec<ManifestLine>, String> {
    let mut lines: Vec<ManifestLine> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}: {line:?}", i + 1);
        let (alg, rest) = line.split_once('(').ok_or_else(|| bad("expected ALGORITHM(FILE)= DIGEST"))?;
        let (file, digest) = rest.rsplit_once(')').ok_or_else(|| bad("expected ALGORITHM(FILE)= DIGEST"))?;
        let digest = digest.trim_start().strip_prefix('=').ok_or_else(|| bad("expected ALGORITHM(FILE)= DIGEST"))?;
        let alg = match alg.trim().to_ascii_uppercase().as_str() {
            "SHA1" => Algorithm::Sha1,
            "SHA256" => Algorithm::Sha256,
            "SHA512" => Algorithm::Sha512,
            _ => return Err(bad("unsupported digest algorithm (SHA1, SHA256 and SHA512 are supported)")),
        };
        let digest = digest.trim().to_ascii_lowercase();
        if digest.len() != alg.hex_len() || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(&format!("not a {} digest", alg.name())));
        }
        let file = file.trim().to_string();
        if lines.iter().any(|(f, _, _)| *f == file) {
            return Err(bad("the file is listed twice"));
        }
        lines.push((file, alg, digest));
    }
    Ok(lines)
}

/// Reads an OVA into the directory `into` (created if missing): returns the
/// descriptor's text and the files written there, in archive order.
///
/// The descriptor is the archive's `.ovf` entry, normally its first (a later
/// one is accepted; two are refused); it is returned, not written. A `.mf`
/// manifest, if any, is not written either but checked: every line must
/// name a file of the archive whose SHA1/SHA256/SHA512 matches, and every
/// file but a `.cert` certificate must be listed. All other entries are
/// written under their names and returned.
///
/// Only regular files with plain names are accepted (a leading `./` is
/// ignored); absolute paths, `..`, directories, links, devices, sparse files
/// and names already present in `into` are refused. On any error the files
/// this call wrote are removed again.
pub fn read_ova(ova: &Path, into: &Path) -> Result<(String, Vec<PathBuf>), OvaError> {
    std::fs::create_dir_all(into).map_err(io_err(into))?;
    let mut created = Vec::new();
    let result = extract(ova, into, &mut created);
    if result.is_err() {
        for p in &created {
            let _ = std::fs::remove_file(p);
        }
    }
    result.map(|ovf| (ovf, created))
}

/// A tar reader over an OVA.
struct TarReader<'p> {
    r: BufReader<File>,
    path: &'p Path,
    offset: u64,
}

/// A parsed tar header.
struct Header {
    name: Vec<u8>,
    size: u64,
    kind: u8,
}

fn field_str(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let digits = field_str(field);
    let digits = digits.trim_ascii();
    digits.iter().try_fold(0u64, |acc, &b| match b {
        b'0'..=b'7' => acc.checked_mul(8)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// Parses a numeric field: octal, or GNU base-256 (first byte 0x80).
fn parse_number(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(0x80) => {
            let body = &field[1..];
            let (high, low) = body.split_at(body.len().saturating_sub(8));
            if high.iter().any(|&b| b != 0) {
                return None;
            }
            Some(low.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        }
        Some(b) if b & 0x80 != 0 => None,
        _ => parse_octal(field),
    }
}

impl TarReader<'_> {
    fn damaged(&self, detail: impl Into<String>) -> OvaError {
        OvaError::Archive { path: self.path.to_path_buf(), detail: detail.into() }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), OvaError> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.damaged(format!("it ends in the middle of an entry (after byte {}); truncated?", self.offset)))
            }
            Err(e) => Err(io_err(self.path)(e)),
        }
    }

    /// The next header, or `None` at the end-of-archive marker.
    fn header(&mut self) -> Result<Option<Header>, OvaError> {
        let mut h = [0u8; BLOCK];
        let at = self.offset;
        let mut got = 0;
        while got < BLOCK {
            match self.r.read(&mut h[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(self.path)(e)),
            }
        }
        self.offset += got as u64;
        match got {
            0 if at == 0 => return Err(self.damaged("it is empty")),
            0 => return Err(self.damaged("it ends without an end-of-archive marker; truncated?")),
            BLOCK => {}
            _ => {
                return Err(
                    self.damaged(format!("a tar header at byte {at} is cut short; not a tar archive, or truncated"))
                );
            }
        }
        if h.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let stored = parse_octal(&h[148..156]);
        let unsigned: u64 =
            h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
        let signed: i64 =
            h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { i64::from(b as i8) }).sum();
        if stored.is_none_or(|s| s != unsigned && i64::try_from(s).ok() != Some(signed)) {
            return Err(self.damaged(format!("bad tar header checksum at byte {at}; not a tar archive, or damaged")));
        }
        let size = parse_number(&h[124..136]).ok_or_else(|| self.damaged(format!("bad size field at byte {at}")))?;
        let mut name = field_str(&h[..100]).to_vec();
        // POSIX ustar splits long names into prefix/name; GNU uses the
        // prefix bytes for other things and says "ustar  ".
        if &h[257..263] == b"ustar\0" {
            let prefix = field_str(&h[345..500]);
            if !prefix.is_empty() {
                name = [prefix, b"/", &name].concat();
            }
        }
        Ok(Some(Header { name, size, kind: h[156] }))
    }

    /// Reads an entry's data of at most `limit` bytes, and its padding.
    fn small(&mut self, size: u64, limit: u64, what: &str) -> Result<Vec<u8>, OvaError> {
        if size > limit {
            return Err(self.damaged(format!("a {what} of {size} bytes (more than the {limit} accepted)")));
        }
        let mut data = vec![0u8; size as usize];
        self.read_exact(&mut data)?;
        self.skip(padding(size) as u64)?;
        Ok(data)
    }

    fn skip(&mut self, n: u64) -> Result<(), OvaError> {
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink()).map_err(io_err(self.path))?;
        self.offset += copied;
        if copied < n {
            return Err(
                self.damaged(format!("it ends in the middle of an entry (after byte {}); truncated?", self.offset))
            );
        }
        Ok(())
    }
}

/// Parses pax records (`LEN key=value\n`), returning the path and size.
fn parse_pax(data: &[u8]) -> Result<(Option<Vec<u8>>, Option<u64>), String> {
    let (mut path, mut size) = (None, None);
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ').ok_or("a pax record has no length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= rest.len())
            .ok_or("a pax record has a bad length")?;
        let record = &rest[sp + 1..len];
        let record = record.strip_suffix(b"\n").ok_or("a pax record does not end in a newline")?;
        let eq = record.iter().position(|&b| b == b'=').ok_or("a pax record has no '='")?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => path = Some(value.to_vec()),
            b"size" => {
                size = Some(
                    std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).ok_or("a pax size is not a number")?,
                )
            }
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok((path, size))
}

fn extract(ova: &Path, into: &Path, created: &mut Vec<PathBuf>) -> Result<String, OvaError> {
    let file = File::open(ova).map_err(io_err(ova))?;
    let mut tar = TarReader { r: BufReader::with_capacity(COPY_BUF, file), path: ova, offset: 0 };
    let refuse = |name: &[u8], reason: &str| OvaError::UnsafeEntry {
        path: ova.to_path_buf(),
        name: String::from_utf8_lossy(name).into_owned(),
        reason: reason.to_string(),
    };
    let manifest_err = |manifest: &str, detail: String| OvaError::Manifest {
        path: ova.to_path_buf(),
        manifest: manifest.to_string(),
        detail,
    };

    let mut descriptor: Option<(String, String)> = None;
    let mut manifest: Option<(String, Vec<ManifestLine>)> = None;
    let mut names = HashSet::new();
    // Extracted files: name, path, digest computed while copying.
    let mut extracted: Vec<Extracted> = Vec::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax: Option<(Option<Vec<u8>>, Option<u64>)> = None;
    let mut buf = vec![0u8; COPY_BUF];

    while let Some(h) = tar.header()? {
        match h.kind {
            b'x' => {
                let data = tar.small(h.size, MAX_META, "pax header")?;
                pax = Some(parse_pax(&data).map_err(|e| tar.damaged(e))?);
                continue;
            }
            b'g' => {
                tar.small(h.size, MAX_META, "pax global header")?;
                continue;
            }
            b'L' | b'K' => {
                let data = tar.small(h.size, MAX_META, "GNU long name")?;
                if h.kind == b'L' {
                    long_name = Some(field_str(&data).to_vec());
                }
                continue;
            }
            _ => {}
        }
        let (pax_path, pax_size) = pax.take().unwrap_or_default();
        let raw = pax_path.or(long_name.take()).unwrap_or(h.name);
        let size = pax_size.unwrap_or(h.size);
        let name = plain_name(&raw).map_err(|reason| refuse(&raw, &reason))?;
        match h.kind {
            b'0' | b'\0' | b'7' => {}
            b'5' if name.is_empty() => {
                tar.skip(size + padding(size) as u64)?;
                continue;
            }
            b'5' => return Err(refuse(&raw, "it is a directory; only plain files belong in an OVA")),
            b'1' => return Err(refuse(&raw, "it is a hard link; only plain files belong in an OVA")),
            b'2' => return Err(refuse(&raw, "it is a symbolic link; only plain files belong in an OVA")),
            b'3' | b'4' => return Err(refuse(&raw, "it is a device; only plain files belong in an OVA")),
            b'6' => return Err(refuse(&raw, "it is a FIFO; only plain files belong in an OVA")),
            b'S' => return Err(refuse(&raw, "it is a GNU sparse file, which OVA readers do not support")),
            k => return Err(refuse(&raw, &format!("unsupported tar entry type {:?}", char::from(k)))),
        }
        if name.is_empty() {
            return Err(refuse(&raw, "a file entry has no name"));
        }
        if !names.insert(name.clone()) {
            return Err(refuse(&raw, "the name appears twice"));
        }

        if has_ext(&name, ".ovf") {
            if let Some((first, _)) = &descriptor {
                return Err(refuse(&raw, &format!("a second OVF descriptor (the first is {first})")));
            }
            let data = tar.small(size, MAX_DESCRIPTOR, "descriptor")?;
            let text = String::from_utf8(data).map_err(|_| refuse(&raw, "the descriptor is not UTF-8"))?;
            descriptor = Some((name, text));
            continue;
        }
        if has_ext(&name, ".mf") {
            if let Some((first, _)) = &manifest {
                return Err(refuse(&raw, &format!("a second manifest (the first is {first})")));
            }
            let data = tar.small(size, MAX_MANIFEST, "manifest")?;
            let text = String::from_utf8(data).map_err(|_| manifest_err(&name, "it is not UTF-8 text".into()))?;
            let lines = parse_manifest(&text).map_err(|e| manifest_err(&name, e))?;
            manifest = Some((name, lines));
            continue;
        }

        let dest = into.join(&name);
        let out = OpenOptions::new().write(true).create_new(true).open(&dest).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                refuse(&raw, &format!("{} already exists", dest.display()))
            } else {
                io_err(&dest)(e)
            }
        })?;
        created.push(dest.clone());
        let alg = manifest.as_ref().and_then(|(_, lines)| lines.iter().find(|(f, _, _)| *f == name)).map(|l| l.1);
        let mut hasher = alg.map(Algorithm::hasher);
        let mut w = BufWriter::with_capacity(COPY_BUF, out);
        let mut left = size;
        while left > 0 {
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            tar.read_exact(&mut buf[..n])?;
            if let Some(h) = &mut hasher {
                h.update(&buf[..n]);
            }
            w.write_all(&buf[..n]).map_err(io_err(&dest))?;
            left -= n as u64;
        }
        w.flush().map_err(io_err(&dest))?;
        tar.skip(padding(size) as u64)?;
        extracted.push((name, dest, alg.zip(hasher.map(Hasher::hex))));
    }

    let (ovf_name, ovf_text) = descriptor.ok_or_else(|| OvaError::NoDescriptor(ova.to_path_buf()))?;
    if let Some((mf, lines)) = manifest {
        for (file, alg, expected) in &lines {
            let actual = if *file == ovf_name {
                let mut h = alg.hasher();
                h.update(ovf_text.as_bytes());
                h.hex()
            } else {
                let Some((_, path, digest)) = extracted.iter().find(|(n, _, _)| n == file) else {
                    return Err(manifest_err(&mf, format!("it lists {file}, which the OVA does not hold")));
                };
                match digest {
                    Some((a, d)) if a == alg => d.clone(),
                    // Written before the manifest came: read it back.
                    _ => {
                        let mut f = File::open(path).map_err(io_err(path))?;
                        let mut h = alg.hasher();
                        loop {
                            let n = match f.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => n,
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                                Err(e) => return Err(io_err(path)(e)),
                            };
                            h.update(&buf[..n]);
                        }
                        h.hex()
                    }
                }
            };
            if actual != *expected {
                return Err(OvaError::Digest {
                    path: ova.to_path_buf(),
                    file: file.clone(),
                    algorithm: alg.name(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let listed = |n: &str| lines.iter().any(|(f, _, _)| f == n);
        for n in std::iter::once(&ovf_name).chain(extracted.iter().map(|(n, _, _)| n)) {
            if !listed(n) && !has_ext(n, ".cert") {
                return Err(manifest_err(&mf, format!("it does not list {n}, so {n} cannot be verified")));
            }
        }
    }
    Ok(ovf_text)
}

/// Check that `path` is a self-contained sparse VMDK (the hosted sparse
/// extent format of monolithicSparse and streamOptimized images, magic
/// `KDMV`), the only disk format an OVA's disks are read in.
///
/// A VMDK can also be a text descriptor naming extent files anywhere on the
/// host, a sparse header with capacity 0 whose embedded descriptor does the
/// same, or a delta disk with a parent (`parentFileNameHint`); qemu-img
/// would follow each, and an uploaded OVA could then import a host file
/// into an appliance. Those are refused here; the caller also opens the
/// image with its format forced and no backing file.
pub fn check_sparse_vmdk(path: &Path) -> Result<(), OvaError> {
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bad = |reason: &str| Err(OvaError::UnsafeDisk { file: file.clone(), reason: reason.to_string() });
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = [0u8; 512];
    if f.read_exact(&mut h).is_err() {
        return bad("it is shorter than a VMDK header");
    }
    if &h[..4] != b"KDMV" {
        return bad("it is not a sparse VMDK (streamOptimized or monolithicSparse); only those are imported");
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let (capacity, desc_offset, desc_size) = (u64_at(12), u64_at(28), u64_at(36));
    if capacity == 0 {
        // qemu then reads the embedded descriptor's extents instead.
        return bad("its header gives no capacity (its embedded descriptor would name other files)");
    }
    if desc_offset == 0 {
        return Ok(());
    }
    if desc_size > 128 {
        return bad("its embedded descriptor is larger than 64 KiB");
    }
    use std::io::Seek;
    let mut desc = vec![0u8; desc_size as usize * 512];
    f.seek(io::SeekFrom::Start(desc_offset.saturating_mul(512))).map_err(io_err(path))?;
    if f.read_exact(&mut desc).is_err() {
        return bad("its embedded descriptor lies past the end of the file");
    }
    let text = String::from_utf8_lossy(&desc);
    for line in text.lines().map(str::trim) {
        let (key, value) =
            line.split_once('=').map(|(k, v)| (k.trim(), v.trim().trim_matches('"'))).unwrap_or((line, ""));
        match key {
            "createType" if value != "streamOptimized" && value != "monolithicSparse" => {
                return bad("its descriptor's createType is neither streamOptimized nor monolithicSparse");
            }
            "parentFileNameHint" => return bad("it is a delta disk with a parent file"),
            "parentCID" if !value.eq_ignore_ascii_case("ffffffff") => {
                return bad("it is a delta disk with a parent");
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip_through_header_fields() {
        for size in [0, 1, 511, 512, (1 << 33) - 1, 1 << 33, 1 << 40, u64::MAX >> 1] {
            let h = ustar_header("x.vmdk", size, 1_700_000_000);
            assert_eq!(parse_number(&h[124..136]), Some(size), "size {size}");
            assert_eq!(parse_octal(&h[136..148]), Some(1_700_000_000));
        }
    }

    #[test]
    fn units() {
        assert_eq!(unit_bytes("byte", "t").unwrap(), 1);
        assert_eq!(unit_bytes("byte * 2^20", "t").unwrap(), 1 << 20);
        assert_eq!(unit_bytes("byte*2^30", "t").unwrap(), 1 << 30);
        assert_eq!(unit_bytes("byte * 10^3", "t").unwrap(), 1000);
        assert_eq!(unit_bytes("byte * 1024", "t").unwrap(), 1024);
        assert_eq!(unit_bytes("MegaBytes", "t").unwrap(), 1 << 20);
        assert_eq!(unit_bytes("GB", "t").unwrap(), 1 << 30);
        assert!(matches!(unit_bytes("furlongs", "t"), Err(OvaError::UnknownUnit { .. })));
        assert!(matches!(unit_bytes("byte * 2^99", "t"), Err(OvaError::UnknownUnit { .. })));
    }

    #[test]
    fn names() {
        assert_eq!(plain_name(b"./a.vmdk").unwrap(), "a.vmdk");
        assert_eq!(plain_name(b"./").unwrap(), "");
        assert!(plain_name(b"/etc/passwd").is_err());
        assert!(plain_name(b"../evil").is_err());
        assert!(plain_name(b"a/b").is_err());
        assert!(plain_name(b"..").is_err());
    }

    #[test]
    fn manifest_lines() {
        let sha1 = "a".repeat(40);
        let sha256 = "B".repeat(64);
        let text = format!("SHA1(x.ovf)= {sha1}\r\n\nSHA256 (y.vmdk) = {sha256}\n");
        let lines = parse_manifest(&text).unwrap();
        assert_eq!(lines[0], ("x.ovf".into(), Algorithm::Sha1, sha1));
        assert_eq!(lines[1], ("y.vmdk".into(), Algorithm::Sha256, sha256.to_ascii_lowercase()));
        assert!(parse_manifest("MD5(x)= 00").is_err());
        assert!(parse_manifest("SHA1(x)= 00").is_err());
    }
}
