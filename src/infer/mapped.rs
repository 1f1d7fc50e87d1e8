//! A checkpoint's parameter file read in place through memory maps, for a ring that computes on
//! the weights where the page cache holds them instead of copying them into its sections.
//!
//! On a CPU the Device tier and the page cache are the same memory: a ring that `pread`s each piece
//! into a section moves every weight byte twice (the kernel's copy into the section, then the
//! compute's read), while resident generation reads it once. Mapped, each section is an address
//! range reserved once ([`SectionMap`]: no access, no memory). A piece is *loaded* by mapping its
//! large parts into the range (whole pages of the file, read-only) and populating them
//! (`MADV_POPULATE_READ`, on an I/O thread: a read from disk where the page cache does not hold
//! the pages, page-table entries only where it does); its small parts (layer norms, biases) are
//! read into buffers. It is *released* by replacing the whole range with an inaccessible mapping
//! again: one system call and one flush of the other cores' address translations per piece,
//! however many parts it has. The process holds the pages of the pieces in its sections and
//! nothing else (the kernel's fault-around stays inside each part's mapping), and the compute
//! reads them where they lie.
//!
//! A section's size is then a piece's *footprint*: its mapped parts rounded out to whole pages,
//! plus its small parts.

use super::model_file::ModelFile;
use super::weights::{all_pieces, Piece};
use crate::error::{Error, Result};
use crate::model::gpt::GptConfig;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Parts smaller than this are read into a buffer of their own rather than mapped: a mapping costs
/// system calls, and page-table entries the release must clear, which a few KiB of copy does not
/// pay for.
const SMALLEST_MAPPED_PART: usize = 64 << 10;

/// Where every piece's parts lie in the file, for mapping them.
pub struct MappedModel {
    /// Each piece's parts as (byte offset, elements), in layout order.
    parts: HashMap<Piece, Vec<(u64, usize)>>,
    page: u64,
    /// Bytes of address range a section needs: the most any piece maps.
    range: usize,
}

/// One part of the piece a section holds.
enum Part {
    /// A part of no elements.
    Empty,
    /// Mapped at this byte offset of the section's range, this many elements.
    Mapped(usize, usize),
    /// A small part, read into a buffer.
    Copied(Vec<f32>),
}

/// A section's reserved address range and the piece mapped into it.
pub struct SectionMap {
    base: NonNull<u8>,
    len: usize,
    parts: Vec<Part>,
}

// SAFETY: the range is this process's own mapping, reached only through the `SectionMap` (`&self`
// to read a loaded piece, `&mut self` to load or release one), so moving it between threads is as
// safe as moving a `Vec`.
unsafe impl Send for SectionMap {}
// SAFETY: shared references only read the mapped pages.
unsafe impl Sync for SectionMap {}

fn os_error(what: String) -> Error {
    Error::runtime(format!("{what}: {}", std::io::Error::last_os_error()))
}

impl SectionMap {
    /// Reserve `len` bytes of address range, inaccessible and without memory.
    fn reserve(len: usize) -> Result<Self> {
        let len = len.max(1);
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses; nothing is replaced.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(os_error(format!(
                "reserving {len} bytes of address range for a ring section"
            )));
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or_else(|| Error::runtime("mmap returned a null address"))?;
        Ok(SectionMap {
            base,
            len,
            parts: Vec::new(),
        })
    }

    /// Whether pages of a piece are mapped into the section (to be released before it is reused).
    pub fn holds_pages(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Mapped(..)))
    }

    /// Unmap the piece the section holds (if any): the whole range becomes inaccessible again in
    /// one call, which clears every page-table entry of the piece's mappings at once.
    pub fn release(&mut self) -> Result<()> {
        let mapped = self.holds_pages();
        self.parts.clear();
        if !mapped {
            return Ok(());
        }
        // SAFETY: replaces this section's own range (and nothing else) with a fresh inaccessible
        // mapping; no slice into it outlives `&mut self`.
        let at = unsafe {
            libc::mmap(
                self.base.as_ptr().cast(),
                self.len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(os_error("releasing a ring section's pages".into()));
        }
        Ok(())
    }
}

impl Drop for SectionMap {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `reserve` and is unmapped once, here; no slice into it
        // outlives the `SectionMap`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl MappedModel {
    /// The parts of every piece of `file`. Refused (use copies instead) on a big-endian machine,
    /// where the file's little-endian floats cannot be read in place, and when a part does not
    /// start on a 4-byte boundary.
    pub fn new(file: &ModelFile, config: &GptConfig) -> Result<Self> {
        if cfg!(target_endian = "big") {
            return Err(Error::config(
                "mapped ring loading reads little-endian floats in place: on this big-endian machine use --ring-load copy",
            ));
        }
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let mut model = MappedModel {
            parts: HashMap::new(),
            page,
            range: 0,
        };
        for piece in all_pieces(config) {
            let ranges = file.piece_parts(piece)?;
            if let Some((offset, _)) = ranges.iter().find(|&&(o, n)| n > 0 && !o.is_multiple_of(4)) {
                return Err(Error::checkpoint(
                    file.path(),
                    format!(
                        "{piece:?} starts at byte {offset}, not on a 4-byte boundary: it cannot be read in place \
                         (use --ring-load copy)"
                    ),
                ));
            }
            let mapped: usize = ranges
                .iter()
                .filter(|&&(_, n)| Self::mapped(n))
                .map(|&(o, n)| model.pages(o, n).1)
                .sum();
            model.range = model.range.max(mapped);
            model.parts.insert(piece, ranges);
        }
        Ok(model)
    }

    /// Whether a part of `elements` is mapped (else read into a buffer).
    fn mapped(elements: usize) -> bool {
        4 * elements >= SMALLEST_MAPPED_PART
    }

    fn parts(&self, piece: Piece) -> Result<&[(u64, usize)]> {
        self.parts
            .get(&piece)
            .map(|p| p.as_slice())
            .ok_or_else(|| Error::shape("mapped model", format!("{piece:?} is not part of this model")))
    }

    /// A part's whole pages: (first byte, bytes).
    fn pages(&self, offset: u64, elements: usize) -> (u64, usize) {
        let start = offset / self.page * self.page;
        let end = (offset + 4 * elements as u64).div_ceil(self.page) * self.page;
        (start, (end - start) as usize)
    }

    /// Bytes of memory `piece` holds once loaded: its mapped parts rounded out to whole pages, its
    /// small parts as they are.
    pub fn footprint(&self, piece: Piece) -> Result<u64> {
        Ok(self
            .parts(piece)?
            .iter()
            .map(|&(o, n)| match n {
                0 => 0,
                n if Self::mapped(n) => self.pages(o, n).1 as u64,
                n => 4 * n as u64,
            })
            .sum())
    }

    /// A section for this model's pieces: an address range large enough for any piece's mapped
    /// parts, reserved without memory.
    pub fn section(&self) -> Result<SectionMap> {
        SectionMap::reserve(self.range)
    }

    /// Load `piece` into `section` (releasing what it held): map its large parts from `file` and
    /// populate them (reading the pages from disk where the page cache does not hold them), read
    /// its small parts. Returns the piece's bytes and, of them, the bytes mapped. An I/O error (a disk fault, a file cut short
    /// behind the ring's back) is an error here rather than a fault when the decoder reads it.
    pub fn load(&self, file: &ModelFile, piece: Piece, section: &mut SectionMap) -> Result<(u64, u64)> {
        section.release()?;
        let mut at = 0usize;
        let (mut bytes, mut mapped_bytes) = (0u64, 0u64);
        for &(offset, n) in self.parts(piece)? {
            bytes += 4 * n as u64;
            if n == 0 {
                section.parts.push(Part::Empty);
                continue;
            }
            if !Self::mapped(n) {
                let mut buf = vec![0.0f32; n];
                file.read_at(offset, &mut buf, &format!("{piece:?}"))?;
                section.parts.push(Part::Copied(buf));
                continue;
            }
            let (start, len) = self.pages(offset, n);
            if at + len > section.len {
                return Err(Error::runtime(format!(
                    "{piece:?} needs more than a section's {} bytes of address range",
                    section.len
                )));
            }
            let file_offset = libc::off_t::try_from(start)
                .map_err(|_| Error::checkpoint(file.path(), format!("{piece:?} lies beyond the mappable offsets")))?;
            // SAFETY: maps the file's pages over this section's own reserved range (`at + len`
            // is inside it, checked above), read-only. The pages are only read, and only while the
            // section holds the piece. Another process truncating or rewriting the file meanwhile
            // could change the mapped bytes or fault on them; checkpoints are written once under a
            // temporary name, renamed into place and never modified in place, so only outside
            // interference could do that (the usual caveat of memory-mapped model loading), and
            // the ring checks the file's length before reading a piece in place.
            let mapped = unsafe {
                libc::mmap(
                    section.base.as_ptr().add(at).cast(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    file.handle().as_raw_fd(),
                    file_offset,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(os_error(format!("mapping {piece:?} from {}", file.path().display())));
            }
            // Recorded at once, so that a failure below still releases this mapping.
            section.parts.push(Part::Mapped(at + (offset - start) as usize, n));
            // SAFETY: populating (or touching) pages of the mapping just made.
            let populated = unsafe { libc::madvise(mapped, len, libc::MADV_POPULATE_READ) };
            if populated != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINVAL) {
                    return Err(Error::io(
                        format!("reading the pages of {piece:?} (bytes {start}..{})", start + len as u64),
                        file.path(),
                        err,
                    ));
                }
                // Kernels before 5.14 do not know MADV_POPULATE_READ: touch a byte of each page.
                // A touch past the end of a file cut meanwhile would raise SIGBUS, so the size is
                // checked first (a cut between the check and the touch still would: `auto`
                // copies instead on such kernels, see `populate_read_supported`).
                if file.changed_size()? {
                    return Err(Error::checkpoint(
                        file.path(),
                        format!("the file changed size while {piece:?} was mapped from it"),
                    ));
                }
                for page in (0..len).step_by(self.page as usize) {
                    // SAFETY: `page` is inside the mapping; a volatile read so that it is kept.
                    unsafe { std::ptr::read_volatile(mapped.cast::<u8>().add(page)) };
                }
            }
            at += len;
            mapped_bytes += 4 * n as u64;
        }
        Ok((bytes, mapped_bytes))
    }

    /// The parts of `piece` in layout order, read in place from `section`, which holds it.
    pub fn views<'a>(&self, piece: Piece, section: &'a SectionMap) -> Result<Vec<&'a [f32]>> {
        let parts = self.parts(piece)?;
        if parts.len() != section.parts.len() {
            return Err(Error::runtime(format!(
                "{piece:?}: the section holds {} parts, the piece has {}",
                section.parts.len(),
                parts.len()
            )));
        }
        parts
            .iter()
            .zip(&section.parts)
            .map(|(&(_, n), part)| match *part {
                Part::Empty if n == 0 => Ok(&[][..]),
                Part::Copied(ref buf) if buf.len() == n => Ok(buf.as_slice()),
                Part::Mapped(at, len) if len == n && at + 4 * n <= section.len && at.is_multiple_of(4) => {
                    // SAFETY: `at..at + 4n` lies inside the section's range (checked), where `load`
                    // mapped this part's pages readable; the slice borrows the section, which
                    // cannot be released or reloaded (`&mut`) while it lives. The pages hold the
                    // file's little-endian f32 (checked little-endian machine; aligned: page-aligned
                    // base plus a multiple of 4).
                    Ok(unsafe { std::slice::from_raw_parts(section.base.as_ptr().add(at).cast::<f32>(), n) })
                }
                _ => Err(Error::runtime(format!(
                    "{piece:?}: a part does not match what the section holds"
                ))),
            })
            .collect()
    }
}

/// Whether this kernel populates a mapping's pages with `MADV_POPULATE_READ` (Linux 5.14 and
/// later), which reports a read error as an error; without it, reading in place touches the pages
/// and an I/O error or a file cut under the ring is a SIGBUS. Probed once, on an anonymous page.
pub fn populate_read_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        // SAFETY: a private anonymous page of our own, advised and unmapped here.
        unsafe {
            let len = 4096;
            let page = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if page == libc::MAP_FAILED {
                return false;
            }
            let ok = libc::madvise(page, len, libc::MADV_POPULATE_READ) == 0;
            libc::munmap(page, len);
            ok
        }
    })
}
