//! The training corpus: the bundled Shakespeare text (compiled into the binary, so `semoe train`
//! works from any directory), or any UTF-8 text file or directory of files given by the user.
//! Tokens are bytes.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

const BUNDLED_TRAIN: &[u8] = include_bytes!("../../data/shakespeare/train.txt.gz");
const BUNDLED_VAL: &[u8] = include_bytes!("../../data/shakespeare/val.txt.gz");

/// Training and validation text, as bytes.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Training bytes (shared with the runtime that trains on them, not copied).
    pub train: std::sync::Arc<Vec<u8>>,
    /// Validation bytes (no text shared with `train`).
    pub val: Vec<u8>,
    /// Where the text came from, for logs.
    pub source: String,
}

fn gunzip(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| Error::parse(what, format!("cannot decompress: {e}")))?;
    Ok(out)
}

impl Corpus {
    /// SHA-256 of the training and validation bytes (each length-prefixed, so moving bytes from one
    /// split to the other changes it), as lowercase hex: what a checkpoint records so that resuming
    /// on different data is caught.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [self.train.as_slice(), self.val.as_slice()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The bundled corpus: 39 works of Shakespeare for training, 3 for validation (data/README.md).
    pub fn bundled() -> Result<Self> {
        Ok(Corpus {
            train: std::sync::Arc::new(gunzip(BUNDLED_TRAIN, "bundled training text")?),
            val: gunzip(BUNDLED_VAL, "bundled validation text")?,
            source: "bundled Shakespeare corpus".into(),
        })
    }

    /// A UTF-8 text file, or a directory whose files (recursively, in sorted path order) are joined
    /// with a blank line. The last `val_fraction` of the bytes is the validation split.
    pub fn from_path(path: &Path, val_fraction: f64, min_split: usize) -> Result<Self> {
        let mut text = read_text(path)?;
        if !(0.0..1.0).contains(&val_fraction) || val_fraction <= 0.0 {
            return Err(Error::config(format!(
                "val_fraction must be in (0, 1), got {val_fraction}"
            )));
        }
        let split = text.len() - ((text.len() as f64 * val_fraction) as usize);
        let (train_len, val_len) = (split, text.len() - split);
        if train_len < min_split || val_len < min_split {
            return Err(Error::parse(
                format!("training data {}", path.display()),
                format!(
                    "{} bytes split at train.val_fraction {val_fraction} into {} training and {} validation bytes: \
                     each split needs at least {min_split} bytes (block_size + 1)",
                    text.len(),
                    train_len,
                    val_len
                ),
            ));
        }
        // Split in place: the text is not held twice (a large corpus would be).
        let val = text.split_off(split);
        Ok(Corpus {
            train: std::sync::Arc::new(text),
            val,
            source: path.display().to_string(),
        })
    }
}

/// Tokens are bytes: a vocabulary smaller than 256 must hold every byte of the text (its `parts`
/// in order), or the first batch that meets one fails deep inside the model. `what` names the text;
/// `data`, the file or directory it was read from (a directory's error names the file within).
pub fn check_vocab<'a>(
    config: &crate::config::TrainConfig,
    parts: impl IntoIterator<Item = &'a [u8]>,
    what: &str,
    data: Option<&Path>,
) -> Result<()> {
    let vocab = config.model.vocab;
    if vocab >= crate::config::BYTE_VOCAB {
        // Every byte fits: no pass over a corpus that may be gigabytes.
        return Ok(());
    }
    let text = parts.into_iter().flatten();
    if let Some((at, byte)) = text.enumerate().find(|(_, &b)| usize::from(b) >= vocab) {
        let within = data
            .filter(|d| d.is_dir())
            .and_then(|d| locate(d, at))
            .map_or(String::new(), |(file, offset)| {
                format!(" (offset {offset} of {})", file.display())
            });
        return Err(Error::config(format!(
            "model.vocab is {vocab}, but {what} holds byte {byte} at offset {at}{within}: every byte of the \
             text must be below model.vocab (256 holds any text)"
        )));
    }
    Ok(())
}

/// The file of directory `dir`'s joined text (see [`read_text`]) holding byte `at` of it, and the
/// byte's offset in that file; `None` if the directory cannot be listed again or `at` falls
/// between two files.
fn locate(dir: &Path, at: usize) -> Option<(std::path::PathBuf, usize)> {
    let mut end = 0usize;
    for f in text_files(dir).ok()? {
        let len = usize::try_from(std::fs::metadata(&f).ok()?.len()).ok()?;
        // As `read_text` joins them: a blank line before each non-empty file but the first text.
        let start = if end == 0 || len == 0 { end } else { end + 2 };
        end = start + len;
        if (start..end).contains(&at) {
            return Some((f, at - start));
        }
    }
    None
}

/// The text of a UTF-8 file, or of a directory's files (recursively, in sorted path order) joined
/// with a blank line; an error names the file that is not text, and an all-blank text is an error.
/// In a directory, symbolic links are followed; a file or directory reached by several names
/// (links, hard links) is read once, under the first of its names in sorted order, so the text
/// depends on the tree alone and not on the order the file system lists it; entries whose name
/// starts with `.` and anything that is neither a file nor a directory (a pipe, a device) are left
/// out.
pub fn read_text(path: &Path) -> Result<Vec<u8>> {
    let files = text_files(path)?;
    let mut text = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| Error::io("cannot read the training data", f, e))?;
        check_text(&bytes, f)?;
        if text.is_empty() {
            // The first (or only) file's bytes become the text: not copied.
            text = bytes;
            continue;
        }
        if !bytes.is_empty() {
            text.extend_from_slice(b"\n\n");
        }
        text.extend_from_slice(&bytes);
    }
    if text.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::parse(format!("training data {}", path.display()), "it is empty"));
    }
    Ok(text)
}

/// The files [`read_text`] reads, in order: `path` itself, or a directory's files.
fn text_files(path: &Path) -> Result<Vec<std::path::PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot read the training data", path, e))?;
    let mut files = Vec::new();
    if meta.is_dir() {
        collect_files(path, &mut files)?;
        files.sort();
        // One file under two names would be read twice (and its tail, the validation text, would
        // also be trained on).
        let mut first_name: std::collections::HashMap<FileKey, std::path::PathBuf> = Default::default();
        let mut kept = Vec::with_capacity(files.len());
        for f in files {
            let keys = file_keys(&f)?;
            if let Some(first) = keys.iter().find_map(|k| first_name.get(k)) {
                crate::say!(
                    "notice: {} is the same file as {} (a link): read once",
                    f.display(),
                    first.display()
                );
                continue;
            }
            for k in keys {
                first_name.insert(k, f.clone());
            }
            kept.push(f);
        }
        files = kept;
        if files.is_empty() {
            return Err(Error::parse(
                format!("training data {}", path.display()),
                "the directory has no files",
            ));
        }
    } else {
        use std::os::unix::fs::FileTypeExt;
        // A device (`/dev/zero`) would be read for ever; a pipe is read to its end.
        if meta.file_type().is_char_device() || meta.file_type().is_block_device() {
            return Err(Error::parse(
                format!("training data {}", path.display()),
                "it is a device, not a text file",
            ));
        }
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// The files under `dir`, through symbolic links (a link to a text is that text); `seen` holds the
/// directories already listed, so that a link back up the tree is listed once, not forever.
fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    collect_files_once(dir, out, &mut std::collections::HashSet::new())
}

fn collect_files_once(
    dir: &Path,
    out: &mut Vec<std::path::PathBuf>,
    seen: &mut std::collections::HashSet<std::path::PathBuf>,
) -> Result<()> {
    let real = std::fs::canonicalize(dir).map_err(|e| Error::io("cannot list the training data", dir, e))?;
    if !seen.insert(real) {
        return Ok(());
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("cannot list the training data", dir, e))? {
        let entry = entry.map_err(|e| Error::io("cannot list the training data", dir, e))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            entries.push(entry.path());
        }
    }
    // In name order, so that a directory reached by two names is listed under the first of them
    // whatever order the file system lists entries in.
    entries.sort();
    for p in entries {
        // `metadata` follows symbolic links (`DirEntry::file_type` would not); a dangling link
        // is an error naming it.
        let kind = std::fs::metadata(&p).map_err(|e| Error::io("cannot read the training data", &p, e))?;
        if kind.is_dir() {
            collect_files_once(&p, out, seen)?;
        } else if kind.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// What tells a file apart whatever its name.
#[derive(Clone, PartialEq, Eq, Hash)]
enum FileKey {
    /// Its path with every symbolic link resolved.
    Real(std::path::PathBuf),
    /// Its device and inode: for a file with several hard links.
    Inode(u64, u64),
}

/// The keys of the file at `path`: its real path, and its inode where it has hard links (and the
/// file system gives inode numbers: a 0 is never taken for another file's).
fn file_keys(path: &Path) -> Result<Vec<FileKey>> {
    use std::os::unix::fs::MetadataExt;
    let fail = |e| Error::io("cannot read the training data", path, e);
    let meta = std::fs::metadata(path).map_err(fail)?;
    let mut keys = vec![FileKey::Real(std::fs::canonicalize(path).map_err(fail)?)];
    if meta.nlink() > 1 && meta.ino() != 0 {
        keys.push(FileKey::Inode(meta.dev(), meta.ino()));
    }
    Ok(keys)
}

/// Text must be UTF-8 without NUL bytes; anything else is most likely a binary file.
fn check_text(bytes: &[u8], path: &Path) -> Result<()> {
    let what = || format!("training data {}", path.display());
    if let Some(pos) = bytes.iter().position(|&b| b == 0) {
        return Err(Error::parse(
            what(),
            format!("it looks binary (a NUL byte at offset {pos}); give a UTF-8 text file"),
        ));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(Error::parse(
            what(),
            format!(
                "it is not UTF-8 text (invalid byte at offset {}); give a UTF-8 text file",
                e.valid_up_to()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_of_links_reads_the_texts_they_point_to_once() {
        let root = std::env::temp_dir().join(format!("semoe-corpus-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (texts, data) = (root.join("texts"), root.join("data"));
        std::fs::create_dir_all(&texts).expect("texts");
        std::fs::create_dir_all(&data).expect("data");
        std::fs::write(texts.join("a.txt"), "first text").expect("a");
        std::fs::write(data.join("b.txt"), "second text").expect("b");
        std::os::unix::fs::symlink(texts.join("a.txt"), data.join("a.txt")).expect("a link to a file");
        // A link back up the tree is listed once, not followed forever.
        std::os::unix::fs::symlink(&data, data.join("loop")).expect("a link to a directory");
        let text = read_text(&data).expect("the texts");
        assert_eq!(String::from_utf8_lossy(&text), "first text\n\nsecond text");
        std::os::unix::fs::symlink(root.join("nothing"), data.join("c.txt")).expect("a dangling link");
        let err = read_text(&data).expect_err("a dangling link").to_string();
        assert!(err.contains("c.txt"), "{err}");
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    /// A fresh directory under the system's temporary one, removed when dropped (a failed test
    /// leaves nothing).
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("semoe-corpus-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_byte_outside_the_vocabulary_is_named_in_its_file() {
        let scratch = Scratch::new("vocab");
        let data = scratch.0.join("data");
        std::fs::create_dir_all(data.join("b")).expect("data");
        std::fs::write(data.join("a.txt"), "hello").expect("a");
        std::fs::write(data.join("b/empty.txt"), "").expect("empty");
        std::fs::write(data.join("c.txt"), "abc\u{e9}").expect("c");
        let text = read_text(&data).expect("the texts");
        assert_eq!(String::from_utf8_lossy(&text), "hello\n\nabc\u{e9}");
        let mut config = crate::config::TrainConfig::default();
        config.model.vocab = 128;
        let err = check_vocab(&config, [&text[..8], &text[8..]], "the text", Some(&data))
            .expect_err("byte 195")
            .to_string();
        let c = data.join("c.txt");
        assert!(
            err.contains(&format!("holds byte 195 at offset 10 (offset 3 of {})", c.display())),
            "{err}"
        );
        // A single file's offset is the file's: nothing to add.
        let err = check_vocab(&config, [&b"abc\xc3"[..]], "the text", Some(&c))
            .expect_err("byte 195")
            .to_string();
        assert!(err.contains("holds byte 195 at offset 3: every"), "{err}");
    }

    #[test]
    fn a_pipe_is_read_to_its_end() {
        let scratch = Scratch::new("pipe");
        let fifo = scratch.0.join("text");
        let c = std::ffi::CString::new(fifo.to_str().expect("path")).expect("c path");
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, "from a pipe\n"))
        };
        let text = read_text(&fifo).expect("a pipe's text");
        writer.join().expect("writer").expect("write");
        assert_eq!(text, b"from a pipe\n");
    }

    #[test]
    fn a_device_is_refused_rather_than_read_for_ever() {
        let dev = std::path::Path::new("/dev/zero");
        if !dev.exists() {
            return;
        }
        let err = read_text(dev).expect_err("a device").to_string();
        assert!(err.contains("it is a device, not a text file"), "{err}");
    }

    #[test]
    fn a_file_or_directory_under_two_names_is_read_once_under_the_first_name() {
        let scratch = Scratch::new("names");
        let data = scratch.0.join("data");
        std::fs::create_dir_all(data.join("z")).expect("z");
        std::fs::write(data.join("m.txt"), "M").expect("m");
        std::fs::write(data.join("z/f.txt"), "F").expect("f");
        // `a` and `z` are one directory: listed as `a` (first in name order) whatever order the
        // file system lists them in, so `F` comes before `M`.
        std::os::unix::fs::symlink(data.join("z"), data.join("a")).expect("a link to a directory");
        // A file under a second name (a link and a hard link) is read once.
        std::os::unix::fs::symlink(data.join("m.txt"), data.join("n.txt")).expect("a link to a file");
        std::fs::hard_link(data.join("m.txt"), data.join("o.txt")).expect("a hard link");
        let text = read_text(&data).expect("the texts");
        assert_eq!(String::from_utf8_lossy(&text), "F\n\nM");
    }
}
