//! Passwords, tokens and the tenant rules.
//!
//! The rule every endpoint follows:
//!
//! - no or unknown token: **401**;
//! - an action the caller's *role* may never do (a Regular User creating a
//!   volume, a Power User creating a Manager): **403**;
//! - a resource outside the caller's tenant (another Power User's volume,
//!   a user that is not the caller or one of its sub-users): **404**, the
//!   same answer as for a name that does not exist, so a tenant cannot learn
//!   what others have.
//!
//! A tenant is a Power User and the users created under it. A Manager sees
//! everything. A Regular User sees its own user record (and, when VMs exist,
//! its one VM: [`can_see_owned`] is the rule a VM will use too, keyed by the
//! VM's owner).

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use blake2::{Blake2s256, Digest};
use rand::Rng;

use crate::model::{Role, User};

/// Hash a password for storage (argon2id, a PHC string with its salt).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).expect("argon2 with default parameters").to_string()
}

/// True when `password` matches the stored `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A new random API token (`keel_` and 64 hex digits).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::thread_rng().r#gen();
    format!("keel_{}", hex(&bytes))
}

/// A new random password of 24 letters and digits.
pub fn new_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..24).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

/// The key a token is stored under: its BLAKE2s-256 hash in hex, so the
/// database never holds a usable token.
pub fn token_key(token: &str) -> String {
    hex(&Blake2s256::digest(token.as_bytes()))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The Power User whose quota `user` counts against: itself if a Power
/// User, its parent if it was created under one.
pub fn tenant_of(user: &User) -> Option<&str> {
    match user.role {
        Role::Power => Some(&user.name),
        _ => user.parent.as_deref(),
    }
}

/// May `actor` see user `target`?
pub fn can_see_user(actor: &User, target: &User) -> bool {
    match actor.role {
        Role::Manager => true,
        Role::Power => target.name == actor.name || target.parent.as_deref() == Some(actor.name.as_str()),
        Role::Regular => target.name == actor.name,
    }
}

/// May `actor` see a resource owned by `owner` (a volume; later a VM)?
pub fn can_see_owned(actor: &User, owner: &User) -> bool {
    match actor.role {
        Role::Manager => true,
        Role::Power => owner.name == actor.name || owner.parent.as_deref() == Some(actor.name.as_str()),
        Role::Regular => owner.name == actor.name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, role: Role, parent: Option<&str>) -> User {
        User {
            name: name.into(),
            role,
            parent: parent.map(Into::into),
            quota: None,
            password_hash: String::new(),
            created: 0,
        }
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct hors", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn tokens_are_random_and_keyed_by_hash() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 64);
        assert_eq!(token_key(&a), token_key(&a));
        assert_ne!(token_key(&a), token_key(&b));
        assert!(!token_key(&a).contains(&a[5..]));
    }

    #[test]
    fn tenants_see_only_their_own() {
        let m = user("admin", Role::Manager, None);
        let p1 = user("p1", Role::Power, None);
        let p2 = user("p2", Role::Power, None);
        let r1 = user("r1", Role::Regular, Some("p1"));
        let r2 = user("r2", Role::Regular, Some("p2"));
        assert!(can_see_user(&m, &r2));
        assert!(can_see_user(&p1, &r1) && can_see_user(&p1, &p1));
        assert!(!can_see_user(&p1, &r2) && !can_see_user(&p1, &p2) && !can_see_user(&p1, &m));
        assert!(can_see_user(&r1, &r1) && !can_see_user(&r1, &p1) && !can_see_user(&r1, &r2));
        assert!(can_see_owned(&p1, &r1) && !can_see_owned(&p1, &p2) && !can_see_owned(&r1, &p1));
        assert_eq!(tenant_of(&r1), Some("p1"));
        assert_eq!(tenant_of(&p2), Some("p2"));
        assert_eq!(tenant_of(&m), None);
    }
}
