//! Small text files a user names on the command line (a config, a join ticket, a job identity, a
//! chaos scenario): read only when they are regular files, and only up to a bound, so that
//! `--config /dev/zero` or a FIFO is an error rather than a process that grows until it is killed.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The largest such file read (a config or a scenario is a few KiB).
pub const MAX_TEXT_FILE: u64 = 16 << 20;

/// The text of the regular file `path` (`what` names it in errors: "the config file"), at most
/// [`MAX_TEXT_FILE`] bytes, UTF-8.
pub fn read(path: &Path, what: &str) -> Result<String> {
    let cannot = |e| Error::io(format!("cannot read {what}"), path, e);
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(Error::config(format!(
            "{what} {} is not a regular file ({})",
            path.display(),
            if meta.is_dir() {
                "a directory"
            } else {
                "a device, a pipe or a socket"
            }
        )));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TEXT_FILE + 1).read_to_end(&mut bytes))
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_TEXT_FILE {
        return Err(Error::config(format!(
            "{what} {} is larger than {} MiB: not a file of this kind",
            path.display(),
            MAX_TEXT_FILE >> 20
        )));
    }
    String::from_utf8(bytes).map_err(|e| Error::parse(format!("{what} {}", path.display()), format!("not UTF-8: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_huge_files_are_refused_by_name() {
        let err = read(Path::new("/dev/zero"), "the config file")
            .expect_err("a device")
            .to_string();
        assert!(err.contains("/dev/zero") && err.contains("not a regular file"), "{err}");
        let dir = std::env::temp_dir();
        let err = read(&dir, "the config file").expect_err("a directory").to_string();
        assert!(err.contains("a directory"), "{err}");
        let big = dir.join(format!("semoe-text-file-test-{}", std::process::id()));
        let file = std::fs::File::create(&big).expect("create");
        file.set_len(MAX_TEXT_FILE + 1).expect("a sparse file");
        let err = read(&big, "the config file").expect_err("too large").to_string();
        assert!(err.contains("larger than 16 MiB"), "{err}");
        file.set_len(3).expect("shrink");
        std::fs::write(&big, b"a=1").expect("write");
        assert_eq!(read(&big, "the config file").expect("a small file"), "a=1");
        std::fs::write(&big, [0xffu8, 0xfe]).expect("write");
        let err = read(&big, "the config file").expect_err("not UTF-8").to_string();
        assert!(err.contains("not UTF-8"), "{err}");
        let _ = std::fs::remove_file(&big);
    }
}
