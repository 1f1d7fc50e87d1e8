//! Lines on stderr that stay whole. The coordinator and the worker processes it starts
//! (`train --processes`) share one stderr, and `eprintln!` may write a line in pieces, so that two
//! processes' lines could interleave mid-line (and a log read by a person or a test breaks).

/// Print one line on stderr in a single write (see [`crate::say!`]).
pub fn say_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut line = args.to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Print one line on stdout, whatever became of the reader: `println!` panics when stdout is a
/// pipe whose reader left (`semoe runs | head -1`).
pub fn out_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut line = args.to_string();
    line.push('\n');
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}

/// Write `text` to stdout when it is the command's product (a config, a JSON report): a failed
/// write is an error, not a panic.
pub fn write_stdout(text: &str, what: &str) -> crate::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| crate::Error::io(format!("cannot write {what}"), "stdout", e))
}

/// `eprintln!` in one write (see the module documentation), and never a panic: a stderr that
/// cannot be written (a closed pipe: `semoe train 2>&1 | head`) must not stop a run before its
/// checkpoint. Lines up to the pipe buffer (4 KiB) stay whole.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::say_line(format_args!($($arg)*))
    };
}

/// `println!` that never panics (see [`out_line`]): for lines a person reads.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::console::out_line(format_args!($($arg)*))
    };
}

/// A byte count for people: `1.50 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
