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

/// `eprintln!` in one write (see the module documentation); lines up to the pipe buffer (4 KiB)
/// stay whole.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::say_line(format_args!($($arg)*))
    };
}
