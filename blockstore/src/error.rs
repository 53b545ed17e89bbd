//! The store's error type: one matchable enum, each variant saying what
//! failed and on what.

use std::io;

/// Result alias for the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the store can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No volume, snapshot or clone by that name.
    #[error("{0} not found")]
    NotFound(String),
    /// The name is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A request the store cannot make sense of (misaligned, empty name, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An I/O beyond the end of the device.
    #[error("I/O at byte {offset} of length {len} is beyond the end of {name} ({size} bytes)")]
    OutOfRange {
        /// Device name.
        name: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A write to a snapshot.
    #[error("{0} is a read-only snapshot")]
    ReadOnly(String),
    /// The pool has no free block left (thin overcommit exhausted).
    #[error(
        "pool is out of space ({free_blocks} free blocks of {total_blocks}): free space by deleting snapshots or volumes, or discarding data"
    )]
    NoSpace {
        /// Free blocks when the allocation failed.
        free_blocks: u64,
        /// Blocks in the data area.
        total_blocks: u64,
    },
    /// Stored bytes failed their checksum: the reader gets this, never the
    /// bad bytes.
    #[error("checksum mismatch in {what} at pool block {block}: the stored data is damaged")]
    Corrupt {
        /// What was being read (data block, map page, ...).
        what: &'static str,
        /// Physical block number.
        block: u64,
    },
    /// The operation would lose data or break an invariant and was refused.
    #[error("refused: {0}")]
    Refused(String),
    /// The pool's headers are not a valid Keel pool.
    #[error("not a usable Keel pool: {0}")]
    Format(String),
    /// The underlying file or device failed.
    #[error("I/O error on the pool device while {op}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The kind of an [`Error`], for callers that map errors onto a protocol
/// (SCSI sense, NBD errno, HTTP status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// See [`Error::NotFound`].
    NotFound,
    /// See [`Error::AlreadyExists`].
    AlreadyExists,
    /// See [`Error::Invalid`].
    Invalid,
    /// See [`Error::OutOfRange`].
    OutOfRange,
    /// See [`Error::ReadOnly`].
    ReadOnly,
    /// See [`Error::NoSpace`].
    NoSpace,
    /// See [`Error::Corrupt`].
    Corrupt,
    /// See [`Error::Refused`].
    Refused,
    /// See [`Error::Format`].
    Format,
    /// See [`Error::Io`].
    Io,
}

impl Error {
    /// The matchable kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::ReadOnly(_) => ErrorKind::ReadOnly,
            Error::NoSpace { .. } => ErrorKind::NoSpace,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Refused(_) => ErrorKind::Refused,
            Error::Format(_) => ErrorKind::Format,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, source }
    }
}
