//! Tar layers read entry by entry, with every allocation bounded.
//!
//! The `tar` crate reads GNU long names and PAX headers whole into memory,
//! whatever size their header declares, before anything can refuse them.
//! This reader walks the 512-byte blocks itself (using `tar::Header` only to
//! decode fields), refuses a metadata entry larger than its cap *before*
//! reading it, and applies GNU long names and PAX `path`, `linkpath` and
//! `size` to the entry they describe. Anything that is not a file,
//! directory, symlink or hardlink (devices, FIFOs, sparse files, GNU dump
//! directories) comes out as [`TarKind::Other`], for the layer rules to
//! refuse.

use std::io::{self, Read};

use crate::modelpack::TarKind;

/// A GNU long name or link name: a path is at most 4,096 bytes.
pub const MAX_LONG_NAME: u64 = 8 << 10;
/// A PAX extended header (paths, sizes, times, perhaps xattrs).
pub const MAX_PAX: u64 = 1 << 20;
/// All metadata entries of one archive together.
pub const MAX_METADATA: u64 = 64 << 20;

const BLOCK: u64 = 512;

/// One entry's header, extensions applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub name: Vec<u8>,
    pub kind: TarKind,
    pub link: Option<Vec<u8>>,
    /// Bytes of data that follow.
    pub size: u64,
    pub mode: Option<u32>,
    pub mtime: Option<u64>,
}

/// Why an archive cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} of {size} bytes is larger than the {limit} bytes allowed")]
    MetadataTooLarge { what: &'static str, size: u64, limit: u64 },
    #[error("its metadata entries hold more than {MAX_METADATA} bytes in all")]
    MetadataTotal,
    #[error("not a tar archive: {0}")]
    Malformed(String),
    #[error("the archive cannot be read")]
    Io(#[source] io::Error),
}

/// Reads a tar stream entry by entry.
pub struct ArchiveReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    ended: bool,
    /// Header blocks read, extension headers included.
    headers: u64,
    /// Bytes of metadata entries read.
    metadata: u64,
}

impl<R: Read> ArchiveReader<R> {
    pub fn new(inner: R) -> ArchiveReader<R> {
        ArchiveReader { inner, remaining: 0, padding: 0, ended: false, headers: 0, metadata: 0 }
    }

    /// Header blocks read so far, extension headers and entries that
    /// create nothing included: what bounds the work of reading.
    pub fn headers(&self) -> u64 {
        self.headers
    }

    /// The next entry, skipping what is left of the current one's data;
    /// `None` at the end of the archive.
    ///
    /// # Errors
    /// A malformed header, metadata past its cap, or a read failure.
    pub fn next_entry(&mut self) -> Result<Option<EntryHeader>, ArchiveError> {
        if self.ended {
            return Ok(None);
        }
        self.skip(self.remaining.saturating_add(self.padding))?;
        self.remaining = 0;
        self.padding = 0;
        let (mut long_name, mut long_link, mut pax_size, mut sparse) = (None, None, None, false);
        loop {
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? || block.iter().all(|byte| *byte == 0) {
                self.ended = true;
                if long_name.is_some() || long_link.is_some() || pax_size.is_some() {
                    return Err(ArchiveError::Malformed("extension headers describe no entry".into()));
                }
                return Ok(None);
            }
            self.headers += 1;
            let header = tar::Header::from_byte_slice(&block);
            check_sum(&block, header)?;
            let declared = header.entry_size().map_err(|error| ArchiveError::Malformed(error.to_string()))?;
            let entry_type = header.entry_type();
            if entry_type.is_gnu_longname() || entry_type.is_gnu_longlink() {
                let what = if entry_type.is_gnu_longname() { "a GNU long-name header" } else { "a GNU long-link header" };
                let mut bytes = self.read_metadata(what, declared, MAX_LONG_NAME)?;
                while bytes.last() == Some(&0) {
                    bytes.pop();
                }
                if entry_type.is_gnu_longname() {
                    long_name = Some(bytes)
                } else {
                    long_link = Some(bytes)
                }
                continue;
            }
            if entry_type.is_pax_global_extensions() {
                self.read_metadata("a PAX global header", declared, MAX_PAX)?;
                continue;
            }
            if entry_type.is_pax_local_extensions() {
                let bytes = self.read_metadata("a PAX header", declared, MAX_PAX)?;
                for extension in tar::PaxExtensions::new(&bytes) {
                    let extension = extension.map_err(|error| ArchiveError::Malformed(format!("a PAX record: {error}")))?;
                    match extension.key_bytes() {
                        b"path" => long_name = Some(extension.value_bytes().to_vec()),
                        b"linkpath" => long_link = Some(extension.value_bytes().to_vec()),
                        // PAX-format GNU sparse files look like plain files
                        // holding their sparse map: not a file to serve.
                        key if key.starts_with(b"GNU.sparse.") => sparse = true,
                        b"size" => {
                            let size = std::str::from_utf8(extension.value_bytes()).ok().and_then(|text| text.parse().ok());
                            pax_size =
                                Some(size.ok_or_else(|| ArchiveError::Malformed("a PAX size that is not a number".into()))?);
                        }
                        _ => {}
                    }
                }
                continue;
            }
            let kind = if sparse {
                TarKind::Other
            } else if entry_type.is_file() || entry_type.is_contiguous() {
                TarKind::File
            } else if entry_type.is_dir() {
                TarKind::Directory
            } else if entry_type.is_symlink() {
                TarKind::Symlink
            } else if entry_type.is_hard_link() {
                TarKind::Hardlink
            } else {
                TarKind::Other
            };
            let size = pax_size.unwrap_or(declared);
            self.remaining = size;
            self.padding = (BLOCK - size % BLOCK) % BLOCK;
            let name = long_name.unwrap_or_else(|| header.path_bytes().into_owned());
            let link = long_link.or_else(|| header.link_name_bytes().map(|bytes| bytes.into_owned()));
            return Ok(Some(EntryHeader { name, kind, link, size, mode: header.mode().ok(), mtime: header.mtime().ok() }));
        }
    }

    /// The current entry's data.
    pub fn data(&mut self) -> EntryData<'_, R> {
        EntryData { reader: self }
    }

    fn read_block(&mut self, block: &mut [u8; BLOCK as usize]) -> Result<bool, ArchiveError> {
        let mut filled = 0;
        while filled < block.len() {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(ArchiveError::Malformed("the archive ends inside a header".into())),
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(ArchiveError::Io(error)),
            }
        }
        Ok(true)
    }

    /// Reads a metadata entry's data after checking its declared size.
    fn read_metadata(&mut self, what: &'static str, size: u64, limit: u64) -> Result<Vec<u8>, ArchiveError> {
        if size > limit {
            return Err(ArchiveError::MetadataTooLarge { what, size, limit });
        }
        self.metadata += size;
        if self.metadata > MAX_METADATA {
            return Err(ArchiveError::MetadataTotal);
        }
        let mut bytes = vec![0; size as usize];
        self.inner.read_exact(&mut bytes).map_err(truncated)?;
        self.skip((BLOCK - size % BLOCK) % BLOCK)?;
        Ok(bytes)
    }

    fn skip(&mut self, bytes: u64) -> Result<(), ArchiveError> {
        let skipped = io::copy(&mut (&mut self.inner).take(bytes), &mut io::sink()).map_err(ArchiveError::Io)?;
        if skipped < bytes {
            return Err(ArchiveError::Malformed("the archive ends inside an entry".into()));
        }
        Ok(())
    }
}

fn truncated(error: io::Error) -> ArchiveError {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        ArchiveError::Malformed("the archive ends inside an entry".into())
    } else {
        ArchiveError::Io(error)
    }
}

/// The header checksum: the sum of the block's bytes with the checksum
/// field read as spaces.
fn check_sum(block: &[u8; BLOCK as usize], header: &tar::Header) -> Result<(), ArchiveError> {
    let sum: u32 = block[..148].iter().chain(&block[156..]).map(|byte| u32::from(*byte)).sum::<u32>() + 8 * u32::from(b' ');
    match header.cksum() {
        Ok(expected) if expected == sum => Ok(()),
        _ => Err(ArchiveError::Malformed("a header's checksum does not match".into())),
    }
}

/// The data of the entry last returned by [`ArchiveReader::next_entry`].
pub struct EntryData<'a, R> {
    reader: &'a mut ArchiveReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let wanted = buffer.len().min(usize::try_from(self.reader.remaining).unwrap_or(usize::MAX));
        if wanted == 0 {
            return Ok(0);
        }
        let read = self.reader.inner.read(&mut buffer[..wanted])?;
        if read == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the archive ends inside an entry"));
        }
        self.reader.remaining -= read as u64;
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_path(name).unwrap();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        header
    }

    fn entries(archive: &[u8]) -> Result<Vec<(EntryHeader, Vec<u8>)>, ArchiveError> {
        let mut reader = ArchiveReader::new(archive);
        let mut found = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            let mut data = Vec::new();
            if entry.name.ends_with(b"read") {
                reader.data().read_to_end(&mut data).map_err(ArchiveError::Io)?;
            }
            found.push((entry, data));
        }
        Ok(found)
    }

    /// Files, long names (GNU and PAX), PAX sizes and links come out as the
    /// `tar` crate writes them; unread data is skipped.
    #[test]
    fn reads_what_tar_writes() {
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header("a/skipped", tar::EntryType::Regular, 3), &b"abc"[..]).unwrap();
        let long = format!("a/{}/read", "x".repeat(300));
        let mut long_header = header("placeholder", tar::EntryType::Regular, 5);
        builder.append_data(&mut long_header, &long, &b"hello"[..]).unwrap();
        let mut link = header("a/link", tar::EntryType::Symlink, 0);
        builder.append_link(&mut link, "a/link", "skipped").unwrap();
        builder.append_pax_extensions([("path", &b"a/pax-read"[..])]).unwrap();
        builder.append(&header("a/short", tar::EntryType::Regular, 2), &b"hi"[..]).unwrap();
        let archive = builder.into_inner().unwrap();
        let found = entries(&archive).unwrap();
        let names: Vec<String> = found.iter().map(|(entry, _)| String::from_utf8(entry.name.clone()).unwrap()).collect();
        assert_eq!(names, ["a/skipped", long.as_str(), "a/link", "a/pax-read"]);
        assert_eq!(found[1].1, b"hello");
        assert_eq!(found[2].0.kind, TarKind::Symlink);
        assert_eq!(found[2].0.link.as_deref(), Some(&b"skipped"[..]));
        assert_eq!(found[3].1, b"hi");
    }

    /// A long-name header declaring a gigabyte is refused from its header,
    /// before anything is read or allocated.
    #[test]
    fn refuses_huge_metadata_before_reading_it() {
        for (kind, what) in [
            (tar::EntryType::GNULongName, "GNU long-name"),
            (tar::EntryType::XHeader, "PAX header"),
            (tar::EntryType::XGlobalHeader, "PAX global"),
        ] {
            let mut block = header("././@LongLink", kind, 1 << 30).as_bytes().to_vec();
            block.extend_from_slice(&[b'x'; 4096]);
            let error = entries(&block).unwrap_err();
            assert!(matches!(error, ArchiveError::MetadataTooLarge { size, .. } if size == 1 << 30), "{what}: {error}");
            assert!(error.to_string().contains(what), "{error}");
        }
    }

    /// Broken archives are errors, never panics: bad checksums, truncation,
    /// extension headers with no entry.
    #[test]
    fn refuses_broken_archives() {
        let mut block = header("a", tar::EntryType::Regular, 10).as_bytes().to_vec();
        block[0] = b'b';
        assert!(matches!(entries(&block), Err(ArchiveError::Malformed(_))));
        let mut short = header("a/read", tar::EntryType::Regular, 10).as_bytes().to_vec();
        short.extend_from_slice(b"abc");
        assert!(entries(&short).is_err());
        let mut dangling = header("x", tar::EntryType::GNULongName, 5).as_bytes().to_vec();
        dangling.extend_from_slice(&[b'n'; 512]);
        assert!(matches!(entries(&dangling), Err(ArchiveError::Malformed(_))));
        assert!(entries(&[1u8; 100]).is_err());
        assert!(entries(&[]).unwrap().is_empty());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes, and any bytes after a valid header, are read or
        /// refused without a panic, and no entry claims more data than
        /// the bytes that follow could hold.
        #[test]
        fn arbitrary_archives_never_panic(
            prefix in prop::collection::vec(any::<u8>(), 0..2048),
            kind in any::<u8>(),
            size in any::<u64>(),
            tail in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            for bytes in [prefix.clone(), {
                let mut header = tar::Header::new_gnu();
                header.set_path("pkg/x").unwrap();
                header.set_entry_type(tar::EntryType::new(kind));
                header.set_size(size);
                header.set_cksum();
                let mut bytes = header.as_bytes().to_vec();
                bytes.extend_from_slice(&tail);
                bytes
            }] {
                let mut reader = ArchiveReader::new(&bytes[..]);
                for _ in 0..8 {
                    match reader.next_entry() {
                        Ok(Some(_)) => {
                            let mut data = Vec::new();
                            let _ = reader.data().take(1 << 16).read_to_end(&mut data);
                            prop_assert!(data.len() <= bytes.len());
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
    }
}
