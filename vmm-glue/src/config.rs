//! A VM's hardware and the QEMU command line it becomes.
//!
//! Disks, NICs and devices are written in QEMU's JSON syntax, the same
//! objects QMP's `blockdev-add`, `netdev_add` and `device_add` take, so a
//! disk hot-plugged into a running VM is configured exactly like one given
//! at start ([`VmDisk::blockdev`], [`VmDisk::device`], [`VmNic::netdev`],
//! [`VmNic::device`]).
//!
//! Names inside QEMU: a disk with id `ID` is block node `drive-ID` and
//! device `ID`; a NIC with id `ID` is netdev `net-ID` and device `ID`; the
//! CD-ROM is drive `cd0` and device [`CDROM_DEVICE`].

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::Accel;

/// The QEMU device id of the CD-ROM drive (for `blockdev-change-medium`
/// and `eject`).
pub const CDROM_DEVICE: &str = "cdrom0";
/// How long QEMU's NBD client holds a guest's I/O while it reconnects to
/// a restarting server.
pub const NBD_RECONNECT_SECS: u32 = 120;
/// The chardev of the guest agent's virtio-serial port.
pub const AGENT_CHARDEV: &str = "qga0";

/// Where a disk's data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// An NBD export (QEMU's built-in NBD client).
    Nbd {
        /// Server host.
        host: String,
        /// Server port.
        port: u16,
        /// Export name.
        export: String,
    },
    /// An NBD export on a Unix socket (the appliance's private channel:
    /// nothing secret goes on QEMU's command line, which every local user
    /// can read).
    NbdUnix {
        /// Socket path.
        path: PathBuf,
        /// Export name.
        export: String,
    },
    /// An iSCSI LUN (QEMU's built-in libiscsi client).
    Iscsi {
        /// `host:port` of the portal.
        portal: String,
        /// Target name.
        target: String,
        /// LUN.
        lun: u32,
    },
    /// A raw file on the host (tests, scratch disks).
    File(PathBuf),
}

/// One disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDisk {
    /// Device id inside QEMU (letters, digits, `-`, `_`; starts with a letter).
    pub id: String,
    /// The data.
    pub source: DiskSource,
    /// Attach read-only.
    pub read_only: bool,
}

impl VmDisk {
    /// The block node name.
    pub fn node(&self) -> String {
        format!("drive-{}", self.id)
    }

    /// The `blockdev-add` / `-blockdev` object.
    pub fn blockdev(&self) -> Value {
        let mut v = match &self.source {
            // A restart of the server (Keel's daemon) pauses the guest's
            // I/O until QEMU reconnects, instead of failing it.
            DiskSource::Nbd { host, port, export } => json!({
                "driver": "nbd",
                "server": { "type": "inet", "host": host, "port": port.to_string() },
                "export": export,
                "reconnect-delay": NBD_RECONNECT_SECS,
            }),
            DiskSource::NbdUnix { path, export } => json!({
                "driver": "nbd",
                "server": { "type": "unix", "path": path },
                "export": export,
                "reconnect-delay": NBD_RECONNECT_SECS,
            }),
            DiskSource::Iscsi { portal, target, lun } => json!({
                "driver": "iscsi",
                "transport": "tcp",
                "portal": portal,
                "target": target,
                "lun": lun,
                "initiator-name": "iqn.2026-11.io.keel:qemu",
            }),
            DiskSource::File(path) => json!({ "driver": "file", "filename": path }),
        };
        v["node-name"] = json!(self.node());
        v["read-only"] = json!(self.read_only);
        v["discard"] = json!("unmap");
        v
    }

    /// The `device_add` / `-device` object (a virtio-blk PCI disk).
    pub fn device(&self, bootindex: Option<u32>) -> Value {
        let mut v = json!({ "driver": "virtio-blk-pci", "drive": self.node(), "id": self.id });
        if let Some(b) = bootindex {
            v["bootindex"] = json!(b);
        }
        v
    }
}

/// How a NIC reaches the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// QEMU's user-mode network (NAT, no setup, no root).
    User,
    /// An existing tap device.
    Tap {
        /// Interface name.
        ifname: String,
    },
    /// A host bridge, through qemu-bridge-helper.
    Bridge {
        /// Bridge name.
        bridge: String,
    },
}

/// One NIC of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNic {
    /// Device id inside QEMU.
    pub id: String,
    /// MAC address, `52:54:00:xx:xx:xx`.
    pub mac: String,
    /// Backend.
    pub backend: NetBackend,
}

impl VmNic {
    /// The netdev id.
    pub fn netdev_id(&self) -> String {
        format!("net-{}", self.id)
    }

    /// The `netdev_add` / `-netdev` object.
    pub fn netdev(&self) -> Value {
        let id = self.netdev_id();
        match &self.backend {
            NetBackend::User => json!({ "type": "user", "id": id }),
            NetBackend::Tap { ifname } => {
                json!({ "type": "tap", "id": id, "ifname": ifname, "script": "no", "downscript": "no" })
            }
            NetBackend::Bridge { bridge } => json!({ "type": "bridge", "id": id, "br": bridge }),
        }
    }

    /// The `device_add` / `-device` object (virtio-net PCI).
    pub fn device(&self, bootindex: Option<u32>) -> Value {
        let mut v = json!({ "driver": "virtio-net-pci", "netdev": self.netdev_id(), "id": self.id, "mac": self.mac });
        if let Some(b) = bootindex {
            v["bootindex"] = json!(b);
        }
        v
    }
}

/// A boot device class, in [`VmConfig::boot`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootDevice {
    /// The CD-ROM.
    Cdrom,
    /// The first disk.
    Disk,
    /// The first NIC (PXE).
    Network,
}

/// Booting a kernel directly instead of through the firmware.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectBoot {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: String,
}

/// Everything QEMU needs to run one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// VM name (shown in `ps` and QEMU's messages).
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Accelerator; must be resolved ([`Accel::Kvm`] or [`Accel::Tcg`]).
    pub accel: Accel,
    /// Disks in order.
    pub disks: Vec<VmDisk>,
    /// The CD-ROM's medium (an ISO file); the drive exists, empty, when
    /// `None`, so a medium can be inserted later.
    pub cdrom: Option<PathBuf>,
    /// NICs in order.
    pub nics: Vec<VmNic>,
    /// Boot order; devices not named are not booted from.
    pub boot: Vec<BootDevice>,
    /// Direct kernel boot, instead of the firmware's boot order.
    pub direct: Option<DirectBoot>,
    /// Directory for the QMP and agent sockets, the pid file and the
    /// serial console log.
    pub run_dir: PathBuf,
}

/// Double the commas of a value in QEMU's `key=value,...` syntax.
fn opt(v: &Path) -> String {
    v.display().to_string().replace(',', ",,")
}

impl VmConfig {
    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    /// The guest agent's socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("qga.sock")
    }
    /// QEMU's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join("qemu.pid")
    }
    /// The serial console, as QEMU writes it (every byte the guest sends,
    /// whether or not anyone is connected to [`VmConfig::serial_socket`]).
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    /// The serial console's socket (QEMU listens; one client at a time):
    /// what the guest writes, and what a client writes reaches the guest.
    pub fn serial_socket(&self) -> PathBuf {
        self.run_dir.join("serial.sock")
    }
    /// The graphical console: QEMU's VNC server on a Unix socket in the
    /// VM's private directory, never a TCP port.
    pub fn vnc_socket(&self) -> PathBuf {
        self.run_dir.join("vnc.sock")
    }

    /// The bootindex of each boot device class.
    fn bootindex(&self, dev: BootDevice) -> Option<u32> {
        if self.direct.is_some() {
            return None;
        }
        self.boot.iter().position(|d| *d == dev).map(|i| i as u32)
    }

    /// The QEMU arguments (without the binary). QEMU daemonizes once the VM
    /// is set up, so its exit status and stderr tell whether it started.
    pub fn argv(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg | Accel::Auto => "tcg",
        };
        let name = format!("guest={},process=keel-vm-{}", self.name.replace(',', ",,"), self.name.replace(',', ",,"));
        push(&["-name", &name, "-machine", "pc", "-accel", accel]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-smp", &self.cpus.to_string(), "-m", &format!("{}M", self.memory_mib)]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        // The serial console is a socket a viewer may connect to, with every
        // byte also logged (QEMU writes the log while no one is connected).
        let console = format!(
            "socket,id=console0,path={},server=on,wait=off,logfile={},logappend=on",
            opt(&self.serial_socket()),
            opt(&self.console_log())
        );
        push(&["-chardev", &console, "-serial", "chardev:console0"]);
        let vnc = format!("unix:{}", opt(&self.vnc_socket()));
        push(&["-device", "VGA,id=video0", "-vnc", &vnc]);
        let qmp = format!("socket,id=qmp0,path={},server=on,wait=off", opt(&self.qmp_socket()));
        push(&["-chardev", &qmp, "-mon", "chardev=qmp0,mode=control"]);
        let qga = format!("socket,id={AGENT_CHARDEV},path={},server=on,wait=off", opt(&self.agent_socket()));
        push(&["-chardev", &qga, "-device", "virtio-serial-pci,id=vser0"]);
        let port = format!("virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV},name=org.qemu.guest_agent.0");
        push(&["-device", &port]);
        let first_disk = self.bootindex(BootDevice::Disk);
        for (i, d) in self.disks.iter().enumerate() {
            let boot = if i == 0 { first_disk } else { None };
            push(&["-blockdev", &d.blockdev().to_string(), "-device", &d.device(boot).to_string()]);
        }
        let mut cd = "if=none,id=cd0,media=cdrom,readonly=on".to_string();
        if let Some(iso) = &self.cdrom {
            cd.push_str(&format!(",format=raw,file={}", opt(iso)));
        }
        let mut cd_dev = format!("ide-cd,drive=cd0,id={CDROM_DEVICE}");
        if let Some(b) = self.bootindex(BootDevice::Cdrom) {
            cd_dev.push_str(&format!(",bootindex={b}"));
        }
        push(&["-drive", &cd, "-device", &cd_dev]);
        let first_nic = self.bootindex(BootDevice::Network);
        for (i, n) in self.nics.iter().enumerate() {
            let boot = if i == 0 { first_nic } else { None };
            push(&["-netdev", &n.netdev().to_string(), "-device", &n.device(boot).to_string()]);
        }
        if let Some(d) = &self.direct {
            push(&["-kernel", &d.kernel.display().to_string()]);
            if let Some(i) = &d.initrd {
                push(&["-initrd", &i.display().to_string()]);
            }
            push(&["-append", &d.append]);
        }
        push(&["-daemonize", "-pidfile", &self.pid_file().display().to_string()]);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "web".into(),
            cpus: 2,
            memory_mib: 512,
            accel: Accel::Tcg,
            disks: vec![
                VmDisk {
                    id: "disk0".into(),
                    source: DiskSource::Nbd { host: "127.0.0.1".into(), port: 10809, export: "web-disk0".into() },
                    read_only: false,
                },
                VmDisk { id: "disk1".into(), source: DiskSource::File("/x,y.raw".into()), read_only: true },
            ],
            cdrom: Some("/isos/debian.iso".into()),
            nics: vec![VmNic { id: "nic0".into(), mac: "52:54:00:aa:bb:cc".into(), backend: NetBackend::User }],
            boot: vec![BootDevice::Cdrom, BootDevice::Disk],
            direct: None,
            run_dir: "/data/vms/web".into(),
        }
    }

    fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn command_line() {
        let c = cfg();
        let a = c.argv();
        assert_eq!(after(&a, "-accel"), ["tcg"]);
        assert!(after(&a, "-cpu").is_empty(), "TCG keeps QEMU's default CPU");
        assert_eq!(after(&a, "-m"), ["512M"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-pidfile"), ["/data/vms/web/qemu.pid"]);
        assert!(a.contains(&"-daemonize".to_string()));
        let bd: Vec<Value> = after(&a, "-blockdev").iter().map(|s| serde_json::from_str(s).unwrap()).collect();
        assert_eq!(bd[0]["driver"], "nbd");
        assert_eq!(bd[0]["server"]["port"], "10809");
        assert_eq!(bd[0]["export"], "web-disk0");
        assert_eq!(bd[0]["node-name"], "drive-disk0");
        assert_eq!(bd[1]["read-only"], true);
        assert_eq!(bd[1]["filename"], "/x,y.raw", "JSON needs no comma escaping");
        let dev: Vec<&str> = after(&a, "-device");
        let disk0: Value = serde_json::from_str(dev.iter().find(|d| d.contains("drive-disk0")).unwrap()).unwrap();
        assert_eq!(disk0["bootindex"], 1);
        assert!(dev.contains(&"ide-cd,drive=cd0,id=cdrom0,bootindex=0"));
        assert_eq!(after(&a, "-drive"), ["if=none,id=cd0,media=cdrom,readonly=on,format=raw,file=/isos/debian.iso"]);
        let nic: Value = serde_json::from_str(dev.iter().find(|d| d.contains("virtio-net")).unwrap()).unwrap();
        assert_eq!(nic["mac"], "52:54:00:aa:bb:cc");
        assert!(nic.get("bootindex").is_none());
        assert!(after(&a, "-chardev").iter().any(|c| c.contains("path=/data/vms/web/qmp.sock,server=on,wait=off")));
    }

    #[test]
    fn kvm_direct_boot_and_escaping() {
        let mut c = cfg();
        c.accel = Accel::Kvm;
        c.cdrom = None;
        c.run_dir = "/d,ir".into();
        c.direct = Some(DirectBoot { kernel: "/k".into(), initrd: Some("/i".into()), append: "console=ttyS0".into() });
        let a = c.argv();
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert_eq!(after(&a, "-kernel"), ["/k"]);
        assert_eq!(after(&a, "-initrd"), ["/i"]);
        assert_eq!(after(&a, "-append"), ["console=ttyS0"]);
        assert_eq!(after(&a, "-drive"), ["if=none,id=cd0,media=cdrom,readonly=on"], "an empty CD drive");
        assert!(!a.iter().any(|x| x.contains("bootindex")), "direct boot: no firmware boot order");
        assert!(after(&a, "-chardev").iter().any(|c| c.contains("path=/d,,ir/serial.sock,server=on,wait=off")
            && c.contains("logfile=/d,,ir/console.log,logappend=on")));
        assert_eq!(after(&a, "-vnc"), ["unix:/d,,ir/vnc.sock"], "VNC on a private socket, never a port");
    }

    #[test]
    fn nic_backends() {
        let n = |backend| VmNic { id: "nic1".into(), mac: "52:54:00:00:00:01".into(), backend };
        assert_eq!(n(NetBackend::User).netdev(), json!({"type": "user", "id": "net-nic1"}));
        assert_eq!(n(NetBackend::Tap { ifname: "tap0".into() }).netdev()["ifname"], "tap0");
        assert_eq!(n(NetBackend::Bridge { bridge: "br0".into() }).netdev()["br"], "br0");
        assert_eq!(n(NetBackend::User).device(Some(2))["bootindex"], 2);
    }
}
