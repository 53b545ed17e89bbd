//! Names that come from outside: one check per kind, applied once, where a
//! request is decoded.
//!
//! Every name a client sends (in a URL path, a query or a JSON body) is
//! parsed into one of the types here before anything uses it: a
//! [`VolumeName`], [`SnapshotName`], [`VmName`], [`ApplianceName`],
//! [`IsoName`], [`UserName`], [`PoolName`] or [`NodeName`]. The types
//! implement `Deserialize` through their check, so a request struct with a
//! `VmName` field cannot hold anything else, and the API's handlers take
//! path segments through [`parse`] into the same types.
//!
//! The rules are narrow on purpose: 1 to 63 bytes of `a-z 0-9 . -` (user
//! names: `a-z 0-9 _ . -`, starting with a letter), so a checked name is a
//! plain file name (no `/`, no `..`, no leading `.`, no NUL or control
//! character), a valid NBD export name and iSCSI IQN part, and safe in
//! QEMU's `key=value` syntax (no `,` or `=`). Code that turns a name into a
//! path goes through [`path_safe`], which applies the same rule again, so a
//! name from a record or from inside the appliance is held to it too.

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{ApiError, ApiResult};

/// Longest appliance name: its base volumes are `_a:NAME:N` in a store that
/// takes names of at most 63 bytes.
pub const MAX_APPLIANCE_NAME: usize = 56;

/// How a name is shown in an error: escaped (control characters and NUL as
/// `\u{..}`) and cut to 64 characters, so an error never carries raw bytes
/// or a megabyte of a client's input back.
fn shown(name: &str) -> String {
    let mut s: String = name.chars().take(64).collect();
    if s.len() < name.len() {
        s.push_str("...");
    }
    format!("{s:?}")
}

/// The rule of volume-like names (volumes, snapshots, VMs, appliances,
/// ISOs, pools, nodes): 1 to `max` bytes of `a-z 0-9 . -`, starting with a
/// letter or digit, so that it is a valid store name, NBD export name and
/// iSCSI name (RFC 3722 allows only lowercase letters, digits, `.`, `-` and
/// `:`, and `:` separates the IQN's parts).
fn check_plain(kind: &str, name: &str, max: usize) -> Result<(), String> {
    let ok_chars = name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
    let ok_start = name.bytes().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > max || !ok_chars || !ok_start {
        return Err(format!(
            "{kind} name {} is not valid: use 1 to {max} characters of a-z, 0-9, '.' and '-', starting with a \
             letter or digit",
            shown(name)
        ));
    }
    Ok(())
}

/// Check a volume name.
pub fn check_volume(name: &str) -> Result<(), String> {
    check_plain("volume", name, 63)
}

/// Check a snapshot name (the rule of volumes).
pub fn check_snapshot(name: &str) -> Result<(), String> {
    check_plain("snapshot", name, 63)
}

/// Check a VM name (the rule of volumes; it names `DATA/vms/NAME`).
pub fn check_vm(name: &str) -> Result<(), String> {
    check_plain("VM", name, 63)
}

/// The longest name of a new VM: its disks are `NAME-diskN` (N up to 99)
/// in a store that takes names of at most 63 bytes.
pub const MAX_NEW_VM_NAME: usize = 56;

/// Check the name of a VM to be made (created, cloned, restored into): the
/// rule of VMs, at most [`MAX_NEW_VM_NAME`] bytes.
pub fn check_new_vm(name: &str) -> Result<(), String> {
    check_plain("VM", name, MAX_NEW_VM_NAME)
}

/// Check an appliance name (the rule of volumes, at most
/// [`MAX_APPLIANCE_NAME`] bytes; it names `DATA/library/appliances/NAME.json`).
pub fn check_appliance(name: &str) -> Result<(), String> {
    check_plain("appliance", name, MAX_APPLIANCE_NAME)
}

/// Check an ISO name (the rule of volumes; it names `DATA/isos/NAME.iso`).
pub fn check_iso(name: &str) -> Result<(), String> {
    check_plain("ISO", name, 63)
}

/// Check a pool name (the rule of volumes).
pub fn check_pool(name: &str) -> Result<(), String> {
    check_plain("pool", name, 63)
}

/// Check a node name (the rule of volumes: a lower-case host name).
pub fn check_node(name: &str) -> Result<(), String> {
    check_plain("node", name, 63)
}

/// Check a user name: 1 to 32 characters of `a-z 0-9 _ . -`, starting with a
/// letter.
pub fn check_user(name: &str) -> Result<(), String> {
    let ok_chars = name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c));
    let ok_start = name.bytes().next().is_some_and(|c| c.is_ascii_lowercase());
    if name.is_empty() || name.len() > 32 || !ok_chars || !ok_start {
        return Err(format!(
            "user name {} is not valid: use 1 to 32 characters of a-z, 0-9, '_', '.' and '-', starting with a letter",
            shown(name)
        ));
    }
    Ok(())
}

/// Check a NIC id (`nic0`, `nic1`, ...: QEMU device ids Keel gives).
pub fn check_nic(id: &str) -> Result<(), String> {
    let digits = id.strip_prefix("nic").unwrap_or("");
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "NIC id {} is not valid: NIC ids are nic0, nic1, ... (`keel vm show` lists them)",
            shown(id)
        ));
    }
    Ok(())
}

/// `name` as a path component, or an error: the last line of defence for
/// code that builds a path from a name (`DATA/vms/NAME`, `DATA/isos/NAME.iso`).
/// A name that passed its kind's check always passes this one.
pub fn path_safe(name: &str) -> ApiResult<&str> {
    check_plain("file", name, 63).map_err(|e| {
        tracing::error!("refused to build a path from {}: {e}", shown(name));
        ApiError::bad(e)
    })?;
    Ok(name)
}

/// A kind of name: its check.
pub trait Kind: Sized {
    /// Check `name`; the error says what is wrong and what is allowed.
    fn check(name: &str) -> Result<(), String>;
    /// Wrap a name that passed [`Kind::check`].
    fn checked(name: String) -> Self;
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $ty(String);

        impl Kind for $ty {
            fn check(name: &str) -> Result<(), String> {
                $check(name)
            }
            fn checked(name: String) -> $ty {
                $ty(name)
            }
        }

        impl $ty {
            /// Parse a name from outside (400 with the rule when it breaks it).
            pub fn parse(name: &str) -> ApiResult<$ty> {
                parse(name)
            }
            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// The name, owned.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl Deref for $ty {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                let s = String::deserialize(d)?;
                $check(&s).map_err(serde::de::Error::custom)?;
                Ok($ty(s))
            }
        }
    };
}

name_type!(
    /// A checked volume name.
    VolumeName,
    check_volume
);
name_type!(
    /// A checked snapshot name.
    SnapshotName,
    check_snapshot
);
name_type!(
    /// A checked VM name.
    VmName,
    check_vm
);
name_type!(
    /// A checked appliance name.
    ApplianceName,
    check_appliance
);
name_type!(
    /// A checked ISO name.
    IsoName,
    check_iso
);
name_type!(
    /// A checked user name.
    UserName,
    check_user
);
name_type!(
    /// A checked pool name.
    PoolName,
    check_pool
);
name_type!(
    /// A checked NIC id.
    NicId,
    check_nic
);
name_type!(
    /// A checked node name.
    NodeName,
    check_node
);

/// Parse a name from outside as a name of kind `T` (400 with the rule when
/// it breaks it).
pub fn parse<T: Kind>(name: &str) -> ApiResult<T> {
    T::check(name).map_err(ApiError::bad)?;
    Ok(T::checked(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every kind must refuse: traversal, separators, NUL, control
    /// characters, leading dots, upper case, and over-long names.
    fn hostile() -> Vec<String> {
        vec![
            String::new(),
            ".".into(),
            "..".into(),
            "../../../../../../tmp/evil".into(),
            "a/b".into(),
            "/etc/passwd".into(),
            "a\\b".into(),
            ".hidden".into(),
            "a\0b".into(),
            "a\nb".into(),
            "a\u{1b}[31m".into(),
            "a\u{7f}".into(),
            "A".into(),
            "a b".into(),
            "a,b=c".into(),
            "a:b".into(),
            "a@b".into(),
            "é".into(),
            "x".repeat(64),
            "x".repeat(100_000),
        ]
    }

    #[test]
    fn every_kind_refuses_hostile_names() {
        type Check = fn(&str) -> Result<(), String>;
        let checks: [(&str, Check); 9] = [
            ("volume", check_volume),
            ("snapshot", check_snapshot),
            ("vm", check_vm),
            ("appliance", check_appliance),
            ("iso", check_iso),
            ("user", check_user),
            ("pool", check_pool),
            ("node", check_node),
            ("nic", check_nic),
        ];
        for (kind, check) in checks {
            for bad in hostile() {
                let e = check(&bad).expect_err(&format!("{kind} took {bad:?}"));
                assert!(e.len() < 400, "{kind}: the error quotes too much: {} bytes", e.len());
                assert!(!e.contains('\0') && !e.contains('\n') && !e.contains('\u{1b}'), "{kind}: raw bytes in {e:?}");
                assert!(path_safe(&bad).is_err(), "path_safe took {bad:?}");
            }
        }
        for good in ["db-1.disk", "a", "0day", &"x".repeat(56)] {
            for check in [check_volume, check_snapshot, check_vm, check_appliance, check_iso, check_pool, check_node] {
                assert!(check(good).is_ok(), "{good}");
            }
            assert!(path_safe(good).is_ok());
        }
        assert!(check_volume(&"x".repeat(63)).is_ok());
        assert!(check_appliance(&"x".repeat(57)).is_err());
        assert!(check_user("alice_2").is_ok());
        for bad in ["2a", "_a", &"x".repeat(33)] {
            assert!(check_user(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn typed_names_check_when_deserialized() {
        #[derive(Deserialize)]
        struct Req {
            #[allow(dead_code)]
            appliance: ApplianceName,
        }
        assert!(serde_json::from_str::<Req>(r#"{"appliance": "web-monday"}"#).is_ok());
        for bad in [r#"{"appliance": "../../tmp/evil"}"#, r#"{"appliance": "a\u0000b"}"#, r#"{"appliance": "a\u0001"}"#]
        {
            let e = serde_json::from_str::<Req>(bad).err().expect(bad).to_string();
            assert!(e.contains("appliance name"), "{e}");
        }
        assert_eq!(parse::<VmName>("web").unwrap().as_str(), "web");
        assert_eq!(parse::<VmName>("../web").unwrap_err().status, axum::http::StatusCode::BAD_REQUEST);
    }
}
