//! Byte sizes as users write them: `512MiB`, `2GiB`, `1.5GB`, `4096`.

use crate::error::{Error, Result};

/// Parse a byte size. Binary (`KiB`, `MiB`, `GiB`, `TiB`) and decimal (`KB`, `MB`, `GB`, `TB`)
/// units are accepted, case-insensitively, with an optional `B`; a bare number is bytes.
/// `what` names the option in the error.
pub fn parse_bytes(what: &str, text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let bad = |why: &str| Error::config(format!("{what} = {text:?}: {why} (write e.g. 512MiB, 2GiB or 1000000)"));
    let value: f64 = number.parse().map_err(|_| bad("not a number followed by a unit"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024f64.powi(4),
        _ => return Err(bad("unknown unit")),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes.round() as u64)
}

/// A byte count for people (`1.50 MiB`): the console's, for the tiers' users.
pub use crate::console::format_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_bare_sizes() {
        assert_eq!(parse_bytes("x", "512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("x", "2 gib").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("x", "1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("x", "4096").unwrap(), 4096);
        assert_eq!(parse_bytes("x", "10KiB").unwrap(), 10240);
    }

    #[test]
    fn rejects_garbage_naming_the_option() {
        let e = parse_bytes("--host-budget", "lots").unwrap_err().to_string();
        assert!(e.contains("--host-budget") && e.contains("lots"), "{e}");
        assert!(parse_bytes("x", "12 parsecs").is_err());
        assert!(parse_bytes("x", "").is_err());
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 20), "3.00 MiB");
    }
}
