//! OVA descriptors and archives: round trips, real-world descriptors, the
//! system tar's view of what we write, and refusal of hostile archives.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_images::ova::{OvaError, OvfDisk, OvfSystem, ovf_xml, parse_ovf, read_ova, write_ova};
use sha2::Digest;

fn system(name: &str, disks: Vec<OvfDisk>) -> OvfSystem {
    OvfSystem { name: name.into(), cpus: 2, memory_bytes: 2 << 30, disks }
}

fn disk(file: &str, capacity_bytes: u64, file_bytes: u64) -> OvfDisk {
    OvfDisk { file: file.into(), capacity_bytes, file_bytes }
}

/// Runs the system tar in `dir`, asserting success; returns stdout.
fn tar(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("tar").current_dir(dir).args(args).output().expect("run tar");
    assert!(out.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn sha1(data: &[u8]) -> String {
    hex::encode(sha1::Sha1::digest(data))
}

/// Bytes that are not all alike, of a size that is not a block multiple.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn ovf_round_trip() {
    let sys = system(
        "web <prod> & 'db' \"x\"",
        vec![disk("web-disk0.vmdk", 20 << 30, 1_234_567), disk("web-disk1.vmdk", 1 << 30, 68_608)],
    );
    let xml = ovf_xml(&sys);
    assert!(xml.contains("web &lt;prod&gt; &amp; &apos;db&apos; &quot;x&quot;"), "{xml}");
    assert!(xml.contains(r#"<rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource>"#));
    assert!(xml.contains(r#"ovf:capacityAllocationUnits="byte""#));
    assert!(xml.contains("vmdk.html#streamOptimized"));
    assert!(xml.contains("<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>"));
    assert!(xml.contains("<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>"));
    assert_eq!(parse_ovf(&xml).unwrap(), sys);
}

#[test]
fn ovf_round_trip_many_disks_odd_memory_unknown_sizes() {
    let disks = (0..17).map(|i| disk(&format!("d{i}.vmdk"), (i + 1) << 20, 0)).collect();
    let sys = OvfSystem { name: "big".into(), cpus: 64, memory_bytes: (3 << 30) + 4096, disks };
    let xml = ovf_xml(&sys);
    // Two controllers; unit 7 of each is the controller's own.
    assert!(xml.contains("<rasd:ElementName>scsiController1</rasd:ElementName>"));
    assert!(!xml.contains("<rasd:AddressOnParent>7</rasd:AddressOnParent>\n        <rasd:Caption>disk"));
    assert!(!xml.contains("ovf:size"));
    assert_eq!(parse_ovf(&xml).unwrap(), sys);
    let doc = parse_ovf(&ovf_xml(&system("no-disks", vec![])));
    assert!(doc.is_ok(), "{doc:?}");
}

/// As VirtualBox 7 exports a VM (trimmed `vbox:Machine`), with capacities in
/// GiB rather than bytes.
const VIRTUALBOX_OVF: &str = r#"<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="debian12-disk001.vmdk"/>
    <File ovf:id="file2" ovf:href="debian12-disk002.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="1c5b0f0e-4a43-4b1c-9c55-0f6f2b1e8d01" ovf:capacityAllocationUnits="byte * 2^30"/>
    <Disk ovf:capacity="8" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="7e1d2a44-5c0b-4d7e-8f2a-3b9c6d4e5f02" ovf:capacityAllocationUnits="byte * 2^30"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="debian12">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian12_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>debian12</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>2 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>1024 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>1024 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>ideController0</rasd:Caption>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>ideController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>1</rasd:Address>
        <rasd:Caption>ideController1</rasd:Caption>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>ideController1</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>3</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Caption>sound</rasd:Caption>
        <rasd:Description>Sound Card</rasd:Description>
        <rasd:ElementName>sound</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>ensoniq1371</rasd:ResourceSubType>
        <rasd:ResourceType>35</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:Parent>5</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:Caption>disk2</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk2</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>5</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>cdrom1</rasd:Caption>
        <rasd:Description>CD-ROM Drive</rasd:Description>
        <rasd:ElementName>cdrom1</rasd:ElementName>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>10</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.19-linux" uuid="{3f0e7c1a-9b2d-4e5f-8a6b-1c2d3e4f5a6b}" name="debian12" OSType="Debian12_64" snapshotFolder="Snapshots" lastStateChange="2024-05-02T09:13:05Z">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware>
        <CPU count="2">
          <PAE enabled="false"/>
          <LongMode enabled="true"/>
        </CPU>
        <Memory RAMSize="1024"/>
        <StorageControllers>
          <StorageController name="SATA" type="AHCI" PortCount="2" useHostIOCache="false" Bootable="true">
            <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="0">
              <Image uuid="{1c5b0f0e-4a43-4b1c-9c55-0f6f2b1e8d01}"/>
            </AttachedDevice>
          </StorageController>
        </StorageControllers>
      </Hardware>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
"#;

#[test]
fn parses_a_virtualbox_export() {
    let sys = parse_ovf(VIRTUALBOX_OVF).unwrap();
    assert_eq!(
        sys,
        OvfSystem {
            name: "debian12".into(),
            cpus: 2,
            memory_bytes: 1024 << 20,
            disks: vec![disk("debian12-disk001.vmdk", 20 << 30, 0), disk("debian12-disk002.vmdk", 8 << 30, 0)],
        }
    );
}

/// As VMware ovftool writes one, with deployment options, byte-power units,
/// a `Name`, sizes in `References`, and the disk items in the opposite order
/// to the `DiskSection`.
const VMWARE_OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by VMware ovftool 4.4.3 (build-18663434), UTC time: 2023-03-01T10:00:00.000Z-->
<Envelope vmw:buildId="build-18663434" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="appliance-disk1.vmdk" ovf:id="file1" ovf:size="1234567"/>
    <File ovf:href="appliance-disk2.vmdk" ovf:id="file2" ovf:size="68608"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="2000000000"/>
    <Disk ovf:capacity="512" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="0"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <DeploymentOptionSection>
    <Info>Deployment sizes</Info>
    <Configuration ovf:id="small">
      <Label>Small</Label>
      <Description>2 CPUs</Description>
    </Configuration>
    <Configuration ovf:default="true" ovf:id="large">
      <Label>Large</Label>
      <Description>4 CPUs</Description>
    </Configuration>
  </DeploymentOptionSection>
  <VirtualSystem ovf:id="vm">
    <Info>A virtual machine</Info>
    <Name>appliance</Name>
    <OperatingSystemSection ovf:id="101" vmw:osType="otherLinux64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>vm</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item ovf:configuration="small">
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">2</vmw:CoresPerSocket>
      </Item>
      <Item ovf:configuration="large">
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>4 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>4096MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>4096</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>Video card</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on &quot;VM Network&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#;

#[test]
fn parses_a_vmware_export() {
    let sys = parse_ovf(VMWARE_OVF).unwrap();
    assert_eq!(
        sys,
        OvfSystem {
            name: "appliance".into(),
            cpus: 4,
            memory_bytes: 4 << 30,
            disks: vec![
                disk("appliance-disk2.vmdk", 512 << 20, 68_608),
                disk("appliance-disk1.vmdk", 16 << 30, 1_234_567)
            ],
        }
    );
}

fn ovf_error(xml: &str) -> String {
    match parse_ovf(xml) {
        Ok(sys) => panic!("parsed {sys:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_descriptors_say_what_is_wrong() {
    let sys = system("web", vec![disk("web-disk0.vmdk", 1 << 30, 0)]);
    let good = ovf_xml(&sys);

    let e = ovf_error("not xml <");
    assert!(e.contains("not well-formed XML"), "{e}");

    let start = good.find("  <DiskSection>").unwrap();
    let end = good.find("  </DiskSection>\n").unwrap() + "  </DiskSection>\n".len();
    let no_section = format!("{}{}", &good[..start], &good[end..]);
    let e = ovf_error(&no_section);
    assert!(e.contains("no DiskSection"), "{e}");

    let e = ovf_error(&good.replace(r#" ovf:fileRef="file1""#, ""));
    assert!(e.contains("vmdisk1 has no file"), "{e}");

    let e =
        ovf_error(&good.replace(r#"ovf:capacityAllocationUnits="byte""#, r#"ovf:capacityAllocationUnits="furlongs""#));
    assert!(e.contains("unknown allocation unit \"furlongs\""), "{e}");

    let e = ovf_error(&good.replace("byte * 2^20", "hectares"));
    assert!(e.contains("unknown allocation unit \"hectares\" in the memory item"), "{e}");

    let e = ovf_error(&good.replace(r#"ovf:href="web-disk0.vmdk""#, r#"ovf:href="../../etc/shadow""#));
    assert!(e.contains("not a plain file name"), "{e}");

    let e = ovf_error(&good.replace(r#"ovf:href="web-disk0.vmdk""#, r#"ovf:href="http://example.com/d.vmdk""#));
    assert!(e.contains("external files are not supported"), "{e}");

    let e = ovf_error(&good.replace("ovf:/disk/vmdisk1", "ovf:/disk/vmdisk9"));
    assert!(e.contains("vmdisk9, which the DiskSection does not list"), "{e}");

    let e = ovf_error(&good.replace("<rasd:ResourceType>3</rasd:ResourceType>", ""));
    assert!(e.contains("no CPU item"), "{e}");

    let e = ovf_error(&good.replace("<Envelope ", "<Bundle ").replace("</Envelope>", "</Bundle>"));
    assert!(e.contains("not an OVF <Envelope>"), "{e}");
}

/// A scratch directory with two source files.
struct Fixture {
    dir: tempfile::TempDir,
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pattern(1000, 1), pattern(513 + 4096, 7));
        fs::create_dir(dir.path().join("src")).unwrap();
        fs::write(dir.path().join("src/a.vmdk"), &a).unwrap();
        fs::write(dir.path().join("src/b.vmdk"), &b).unwrap();
        Fixture { dir, a, b }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn files(&self) -> Vec<(String, PathBuf)> {
        vec![("web-disk0.vmdk".into(), self.path("src/a.vmdk")), ("web-disk1.vmdk".into(), self.path("src/b.vmdk"))]
    }

    fn ovf(&self) -> String {
        ovf_xml(&system(
            "web",
            vec![
                disk("web-disk0.vmdk", 1 << 30, self.a.len() as u64),
                disk("web-disk1.vmdk", 1 << 30, self.b.len() as u64),
            ],
        ))
    }
}

#[test]
fn write_ova_is_a_tar_the_system_tar_reads() {
    let fx = Fixture::new();
    let out = fx.path("web.ova");
    fs::write(&out, b"an old file, replaced").unwrap();
    write_ova(&out, "web.ovf", &fx.ovf(), &fx.files()).unwrap();

    let raw = fs::read(&out).unwrap();
    assert_eq!(raw.len() % 512, 0);
    assert_eq!(&raw[257..263], b"ustar\0", "POSIX ustar magic");
    assert!(raw.ends_with(&[0u8; 1024]), "two zero blocks close the archive");

    let listing = tar(fx.dir.path(), &["-tf", "web.ova"]);
    assert_eq!(listing.lines().collect::<Vec<_>>(), ["web.ovf", "web-disk0.vmdk", "web-disk1.vmdk"]);
    let verbose = tar(fx.dir.path(), &["-tvf", "web.ova"]);
    assert!(verbose.lines().all(|l| l.starts_with("-rw-r--r--")), "{verbose}");

    fs::create_dir(fx.path("x")).unwrap();
    tar(fx.dir.path(), &["-xf", "web.ova", "-C", "x"]);
    assert_eq!(fs::read_to_string(fx.path("x/web.ovf")).unwrap(), fx.ovf());
    assert_eq!(fs::read(fx.path("x/web-disk0.vmdk")).unwrap(), fx.a);
    assert_eq!(fs::read(fx.path("x/web-disk1.vmdk")).unwrap(), fx.b);

    // No temporary file is left next to it.
    let names: Vec<_> = fs::read_dir(fx.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn read_ova_extracts_what_write_ova_wrote() {
    let fx = Fixture::new();
    let out = fx.path("web.ova");
    write_ova(&out, "web.ovf", &fx.ovf(), &fx.files()).unwrap();
    let into = fx.path("into");
    let (ovf, files) = read_ova(&out, &into).unwrap();
    assert_eq!(ovf, fx.ovf());
    assert_eq!(files, vec![into.join("web-disk0.vmdk"), into.join("web-disk1.vmdk")]);
    assert_eq!(fs::read(&files[0]).unwrap(), fx.a);
    assert_eq!(fs::read(&files[1]).unwrap(), fx.b);
    let sys = parse_ovf(&ovf).unwrap();
    assert_eq!(sys.disks[1].file_bytes, fx.b.len() as u64);

    // Unpacking again over the same files is refused, not an overwrite.
    let e = read_ova(&out, &into).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(fs::read(&files[0]).unwrap(), fx.a);
}

#[test]
fn read_ova_takes_archives_of_the_system_tar() {
    let fx = Fixture::new();
    fs::write(fx.path("src/web.ovf"), fx.ovf()).unwrap();
    // A name longer than ustar's 100 bytes: a GNU long-name entry, or a pax
    // header; the descriptor last and entries under "./".
    let long = format!("{}.vmdk", "l".repeat(120));
    fs::copy(fx.path("src/b.vmdk"), fx.path(&format!("src/{long}"))).unwrap();
    for format in ["gnu", "pax", "ustar"] {
        let ova = fx.path(&format!("{format}.ova"));
        let ova = ova.to_str().unwrap();
        let names: &[&str] = if format == "ustar" { &["./a.vmdk", "./web.ovf"] } else { &["a.vmdk", &long, "web.ovf"] };
        let mut args =
            vec!["-cf", ova, &format!("--format={format}")].into_iter().map(String::from).collect::<Vec<_>>();
        args.extend(names.iter().map(|n| n.to_string()));
        tar(&fx.path("src"), &args.iter().map(String::as_str).collect::<Vec<_>>());

        let into = fx.path(&format!("into-{format}"));
        let (ovf, files) = read_ova(Path::new(ova), &into).unwrap();
        assert_eq!(ovf, fx.ovf(), "{format}");
        assert_eq!(fs::read(into.join("a.vmdk")).unwrap(), fx.a, "{format}");
        if format != "ustar" {
            assert_eq!(files, vec![into.join("a.vmdk"), into.join(&long)]);
            assert_eq!(fs::read(into.join(&long)).unwrap(), fx.b, "{format}");
        }
    }
}

/// Builds `name.ova` in the fixture with the system tar from `args` (run in
/// `src/`, which holds `web.ovf`), reads it into a fresh directory, and
/// returns the error, checking nothing was left behind.
fn refused(fx: &Fixture, name: &str, args: &[&str]) -> OvaError {
    fs::write(fx.path("src/web.ovf"), fx.ovf()).unwrap();
    let ova = fx.path(&format!("{name}.ova"));
    let mut all = vec!["-cf", ova.to_str().unwrap()];
    all.extend_from_slice(args);
    tar(&fx.path("src"), &all);
    let into = fx.path(&format!("into-{name}"));
    let e = read_ova(&ova, &into).unwrap_err();
    assert_eq!(fs::read_dir(&into).unwrap().count(), 0, "{name}: files left after refusal");
    e
}

#[test]
fn hostile_entries_are_refused() {
    let fx = Fixture::new();
    fs::write(fx.path("evil"), b"owned").unwrap();
    let absolute = fx.path("evil");
    let absolute = absolute.to_str().unwrap();

    let e = refused(&fx, "dotdot", &["-P", "web.ovf", "a.vmdk", "../evil"]);
    assert!(matches!(&e, OvaError::UnsafeEntry { name, .. } if name == "../evil"), "{e}");
    assert!(e.to_string().contains("'..'"), "{e}");

    let e = refused(&fx, "absolute", &["-P", "web.ovf", absolute]);
    assert!(e.to_string().contains("absolute path"), "{e}");

    symlink("/etc/passwd", fx.path("src/link.vmdk")).unwrap();
    let e = refused(&fx, "symlink", &["web.ovf", "a.vmdk", "link.vmdk"]);
    assert!(e.to_string().contains("symbolic link"), "{e}");
    fs::remove_file(fx.path("src/link.vmdk")).unwrap();

    fs::hard_link(fx.path("src/a.vmdk"), fx.path("src/hard.vmdk")).unwrap();
    let e = refused(&fx, "hardlink", &["web.ovf", "a.vmdk", "hard.vmdk"]);
    assert!(e.to_string().contains("hard link"), "{e}");
    fs::remove_file(fx.path("src/hard.vmdk")).unwrap();

    let e = refused(&fx, "device", &["web.ovf", "--transform=s,^dev/,,", "-C", "/", "dev/null"]);
    assert!(e.to_string().contains("device"), "{e}");

    fs::create_dir(fx.path("src/sub")).unwrap();
    fs::write(fx.path("src/sub/d.vmdk"), b"x").unwrap();
    let e = refused(&fx, "subdir", &["web.ovf", "sub"]);
    assert!(e.to_string().contains("directory"), "{e}");

    let e = refused(&fx, "two-ovf", &["--transform=s,^a.vmdk$,other.ovf,", "web.ovf", "a.vmdk"]);
    assert!(e.to_string().contains("second OVF descriptor"), "{e}");

    let e = refused(&fx, "no-ovf", &["a.vmdk", "b.vmdk"]);
    assert!(matches!(e, OvaError::NoDescriptor(_)), "{e}");

    // Nothing escaped.
    assert_eq!(fs::read(fx.path("evil")).unwrap(), b"owned");
}

#[test]
fn truncated_and_foreign_files_are_not_ovas() {
    let fx = Fixture::new();
    let out = fx.path("web.ova");
    write_ova(&out, "web.ovf", &fx.ovf(), &fx.files()).unwrap();
    let raw = fs::read(&out).unwrap();

    fs::write(fx.path("cut.ova"), &raw[..raw.len() - 1024 - 600]).unwrap();
    let e = read_ova(&fx.path("cut.ova"), &fx.path("into-cut")).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_eq!(fs::read_dir(fx.path("into-cut")).unwrap().count(), 0);

    fs::write(fx.path("junk.ova"), "junk").unwrap();
    let e = read_ova(&fx.path("junk.ova"), &fx.path("into-junk")).unwrap_err();
    assert!(e.to_string().contains("not a tar archive"), "{e}");

    fs::write(fx.path("text.ova"), "hello\n".repeat(200)).unwrap();
    let e = read_ova(&fx.path("text.ova"), &fx.path("into-text")).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
}

fn manifest_ova(fx: &Fixture, name: &str, manifest: &str, mf_last: bool) -> Result<(String, Vec<PathBuf>), OvaError> {
    fs::write(fx.path(&format!("{name}.mf")), manifest).unwrap();
    let mf = ("web.mf".to_string(), fx.path(&format!("{name}.mf")));
    let mut files = fx.files();
    if mf_last {
        files.push(mf);
    } else {
        files.insert(0, mf);
    }
    let ova = fx.path(&format!("{name}.ova"));
    write_ova(&ova, "web.ovf", &fx.ovf(), &files).unwrap();
    read_ova(&ova, &fx.path(&format!("into-{name}")))
}

#[test]
fn manifests_are_checked() {
    let fx = Fixture::new();
    let ovf = fx.ovf();
    let good256 = format!(
        "SHA256(web.ovf)= {}\nSHA256(web-disk0.vmdk)= {}\nSHA256(web-disk1.vmdk)= {}\n",
        sha256(ovf.as_bytes()),
        sha256(&fx.a),
        sha256(&fx.b)
    );
    let (_, files) = manifest_ova(&fx, "good256", &good256, false).unwrap();
    assert_eq!(files.len(), 2, "the manifest is checked, not extracted");

    // SHA1, as older VirtualBox and ovftool write, after the disks.
    let good1 = format!(
        "SHA1 (web.ovf) = {}\r\nSHA1 (web-disk0.vmdk) = {}\r\nSHA1 (web-disk1.vmdk) = {}\r\n",
        sha1(ovf.as_bytes()),
        sha1(&fx.a).to_uppercase(),
        sha1(&fx.b)
    );
    manifest_ova(&fx, "good1", &good1, true).unwrap();

    let mut b = fx.b.clone();
    b[4000] ^= 1;
    let bad = good256.replace(&sha256(&fx.b), &sha256(&b));
    for (name, mf_last) in [("bad", false), ("bad-last", true)] {
        let e = manifest_ova(&fx, name, &bad, mf_last).unwrap_err();
        assert!(matches!(&e, OvaError::Digest { file, algorithm: "SHA256", .. } if file == "web-disk1.vmdk"), "{e}");
        assert!(e.to_string().contains("damaged or was altered"), "{e}");
        assert_eq!(fs::read_dir(fx.path(&format!("into-{name}"))).unwrap().count(), 0);
    }

    let e =
        manifest_ova(&fx, "bad-ovf", &good256.replace(&sha256(ovf.as_bytes()), &"0".repeat(64)), false).unwrap_err();
    assert!(matches!(&e, OvaError::Digest { file, .. } if file == "web.ovf"), "{e}");

    let missing = format!("{good256}SHA256(web-disk2.vmdk)= {}\n", "0".repeat(64));
    let e = manifest_ova(&fx, "missing", &missing, false).unwrap_err();
    assert!(e.to_string().contains("lists web-disk2.vmdk, which the OVA does not hold"), "{e}");

    let partial: String = good256.lines().take(2).map(|l| format!("{l}\n")).collect();
    let e = manifest_ova(&fx, "partial", &partial, false).unwrap_err();
    assert!(e.to_string().contains("does not list web-disk1.vmdk"), "{e}");

    let e = manifest_ova(&fx, "garbage", "MD5(web.ovf)= 00\n", false).unwrap_err();
    assert!(matches!(e, OvaError::Manifest { .. }), "{e}");
}

#[test]
fn write_ova_refuses_bad_names_and_leaves_nothing() {
    let fx = Fixture::new();
    let out = fx.path("web.ova");
    let src = fx.path("src/a.vmdk");
    let cases: Vec<(&str, Vec<(String, PathBuf)>)> = vec![
        ("web.xml", vec![]),
        ("web.ovf", vec![("sub/a.vmdk".into(), src.clone())]),
        ("web.ovf", vec![(format!("{}.vmdk", "x".repeat(95)), src.clone())]),
        ("web.ovf", vec![("a.vmdk".into(), src.clone()), ("a.vmdk".into(), src.clone())]),
        ("web.ovf", vec![("web.ovf".into(), src.clone())]),
        ("web.ovf", vec![("other.ovf".into(), src.clone())]),
        ("web.ovf", vec![("..".into(), src.clone())]),
    ];
    for (ovf_name, files) in cases {
        let e = write_ova(&out, ovf_name, "<Envelope/>", &files).unwrap_err();
        assert!(matches!(e, OvaError::BadName { .. }), "{ovf_name} {files:?}: {e}");
    }
    let e = write_ova(&out, "web.ovf", "<Envelope/>", &[("a.vmdk".into(), fx.path("src/none"))]).unwrap_err();
    assert!(matches!(&e, OvaError::Io { path, .. } if path.ends_with("src/none")), "{e}");
    let names: Vec<_> = fs::read_dir(fx.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["src"], "no OVA and no temporary file");
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("run qemu-img (qemu-utils)");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Only self-contained sparse VMDKs are read from an OVA: images that would
/// make qemu-img open another host file (a text descriptor's extent, a
/// parent disk, a qcow2 backing file, a sparse header whose embedded
/// descriptor names extents) are refused before qemu-img sees them.
#[test]
fn disk_images_that_reach_other_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_str().unwrap().to_string();
    for sub in ["streamOptimized", "monolithicSparse"] {
        let f = format!("{sub}.vmdk");
        qemu_img(&["create", "-q", "-f", "vmdk", "-o", &format!("subformat={sub}"), &s(&f), "8M"]);
        keel_images::ova::check_sparse_vmdk(&p(&f)).unwrap_or_else(|e| panic!("{sub}: {e}"));
    }
    let secret = p("secret");
    fs::write(&secret, b"host secret\n").unwrap();
    // A text descriptor whose extent is a host file.
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 1 FLAT \"{}\" 0\n",
        secret.display()
    );
    fs::write(p("flat.vmdk"), format!("{desc}{}", "#\n".repeat(300))).unwrap();
    // A delta disk whose parent is another file.
    qemu_img(&["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", &s("parent.vmdk"), "8M"]);
    qemu_img(&["create", "-q", "-f", "vmdk", "-b", &s("parent.vmdk"), "-F", "vmdk", &s("delta.vmdk")]);
    // A qcow2 whose backing file is the host file.
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &s("secret"), "-F", "raw", &s("backed.qcow2")]);
    // A sparse header with capacity 0: qemu reads its embedded descriptor's extents.
    let mut zero_cap = fs::read(p("monolithicSparse.vmdk")).unwrap();
    zero_cap[12..20].copy_from_slice(&0u64.to_le_bytes());
    fs::write(p("zero-capacity.vmdk"), zero_cap).unwrap();
    fs::write(p("short.vmdk"), b"KDMV").unwrap();
    for (f, why) in [
        ("flat.vmdk", "not a sparse VMDK"),
        ("delta.vmdk", "parent"),
        ("backed.qcow2", "not a sparse VMDK"),
        ("zero-capacity.vmdk", "no capacity"),
        ("short.vmdk", "shorter"),
    ] {
        match keel_images::ova::check_sparse_vmdk(&p(f)) {
            Err(e @ OvaError::UnsafeDisk { .. }) => {
                let e = e.to_string();
                assert!(e.contains(why), "{f}: {e}");
                assert!(!e.contains(dir.path().to_str().unwrap()), "{f}: the error names a host path: {e}");
            }
            other => panic!("{f}: {other:?}"),
        }
    }
}
