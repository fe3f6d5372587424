//! Sizes, shares of a disk and durations as operators write them in settings.

use std::fmt;

/// Parses a size: a number with an optional unit. Decimal units are powers of
/// 1000 (`k`, `KB`, `M`, `MB`, `G`, `GB`, `T`, `TB`, `P`, `PB`), binary units
/// powers of 1024 (`Ki`, `KiB`, `Mi`, `MiB`, …); units are case-insensitive and
/// `B` or no unit means bytes. Fractions are allowed: `1.5GiB`.
///
/// # Errors
/// A message naming the text and what is wrong with it.
///
/// ```
/// use modelcache_policy::size::parse_size;
/// assert_eq!(parse_size("500GiB"), Ok(500 << 30));
/// assert_eq!(parse_size("2 MB"), Ok(2_000_000));
/// assert!(parse_size("ten").is_err());
/// ```
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("`{text}` is not a size (expected e.g. `500GiB` or `80GB`)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "p" | "pb" => 1_000_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        "pi" | "pib" => 1 << 50,
        _ => return Err(format!("`{text}` has an unknown unit `{unit}` (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")),
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Bytes in binary units with one decimal, for messages: `1.5 GiB`.
///
/// ```
/// use modelcache_policy::size::HumanBytes;
/// assert_eq!(HumanBytes(1536 << 20).to_string(), "1.5 GiB");
/// assert_eq!(HumanBytes(512).to_string(), "512 B");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// A limit written either as a size (`500GiB`) or as a share of the
/// filesystem (`80%`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A share of the filesystem's total size, in percent (0–100).
    Percent(f64),
}

impl Limit {
    /// Parses `80%` or a size as [`parse_size`] does.
    ///
    /// # Errors
    /// A message naming the text; shares must lie between 0% and 100%.
    ///
    /// ```
    /// use modelcache_policy::size::Limit;
    /// assert_eq!(Limit::parse("80%").unwrap().bytes_of(1000), 800);
    /// assert_eq!(Limit::parse("1KiB").unwrap().bytes_of(10), 1024);
    /// ```
    pub fn parse(text: &str) -> Result<Limit, String> {
        match text.trim().strip_suffix('%') {
            Some(percent) => {
                let value: f64 = percent.trim().parse().map_err(|_| format!("`{text}` is not a percentage"))?;
                if !(0.0..=100.0).contains(&value) {
                    return Err(format!("`{text}` must lie between 0% and 100%"));
                }
                Ok(Limit::Percent(value))
            }
            None => parse_size(text).map(Limit::Bytes),
        }
    }

    /// The limit in bytes on a filesystem of `total_bytes`.
    pub fn bytes_of(&self, total_bytes: u64) -> u64 {
        match *self {
            Limit::Bytes(bytes) => bytes,
            Limit::Percent(percent) => (total_bytes as f64 * percent / 100.0) as u64,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Limit::Bytes(bytes) => HumanBytes(bytes).fmt(f),
            Limit::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

/// Parses a duration: a whole number with a unit `s`, `m`, `h`, `d` or `w`,
/// into seconds.
///
/// # Errors
/// A message naming the text.
///
/// ```
/// use modelcache_policy::size::parse_duration;
/// assert_eq!(parse_duration("7d"), Ok(7 * 86_400));
/// assert_eq!(parse_duration("90s"), Ok(90));
/// ```
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration (expected e.g. `30m`, `12h`, `7d`)"))?;
    let seconds = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("`{text}` needs a unit: s, m, h, d or w")),
    };
    number.checked_mul(seconds).ok_or_else(|| format!("`{text}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes in every unit family parse to the bytes operators mean.
    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("17B"), Ok(17));
        assert_eq!(parse_size("1k"), Ok(1000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("3 TB"), Ok(3_000_000_000_000));
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("1.2.3GB").is_err());
    }

    /// Messages show sizes in binary units with one decimal.
    #[test]
    fn human_bytes_rounds_to_one_decimal() {
        assert_eq!(HumanBytes(0).to_string(), "0 B");
        assert_eq!(HumanBytes(1024).to_string(), "1.0 KiB");
        assert_eq!(HumanBytes(500 << 30).to_string(), "500.0 GiB");
    }

    /// A share is resolved against the filesystem size; nonsense is refused.
    #[test]
    fn limits_are_sizes_or_shares() {
        assert_eq!(Limit::parse("50%").unwrap().bytes_of(3000), 1500);
        assert_eq!(Limit::parse(" 10 % ").unwrap(), Limit::Percent(10.0));
        assert!(Limit::parse("120%").is_err());
        assert!(Limit::parse("x%").is_err());
        assert_eq!(Limit::parse("2KB").unwrap(), Limit::Bytes(2000));
    }

    /// Durations need a unit and convert to seconds.
    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("2w"), Ok(1_209_600));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("m").is_err());
    }
}
