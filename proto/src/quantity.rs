//! Parsing the quantities people type: cpu (`2`, `1.5`, `500m`), bytes (`512Mi`, `4Gi`, `1G`,
//! `1048576`), durations (`30s`, `5m`, `1h30m`, `250ms`). Shared by the CLI, specs and the agent.

use std::time::Duration;

/// cpu in millicores: `2` = 2000, `0.5` = 500, `250m` = 250.
pub fn parse_cpu_millis(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(m) = t.strip_suffix('m') {
        return m
            .parse::<u64>()
            .map_err(|_| format!("'{s}' is not a cpu quantity (e.g. 2, 0.5, 500m)"));
    }
    let cores: f64 = t
        .parse()
        .map_err(|_| format!("'{s}' is not a cpu quantity (e.g. 2, 0.5, 500m)"))?;
    if !(0.0..=1_000_000.0).contains(&cores) {
        return Err(format!("cpu '{s}' is out of range"));
    }
    Ok((cores * 1000.0).round() as u64)
}

/// Bytes: binary suffixes Ki Mi Gi Ti, decimal k/K M G T, or a plain number.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let bad = || format!("'{s}' is not a byte quantity (e.g. 512Mi, 4Gi, 1G, 1048576)");
    for (suffix, mult) in units {
        if let Some(n) = t
            .strip_suffix(suffix)
            .or_else(|| t.strip_suffix(&suffix.to_lowercase()))
        {
            let v: f64 = n.trim().parse().map_err(|_| bad())?;
            if v < 0.0 {
                return Err(bad());
            }
            return Ok((v * mult as f64).round() as u64);
        }
    }
    t.strip_suffix('B').unwrap_or(t).parse().map_err(|_| bad())
}

/// Durations: a sequence of NUMBER UNIT with units ms, s, m, h, d; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("'{s}' is not a duration (e.g. 30s, 5m, 1h30m, 250ms)");
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            _ => return Err(bad()),
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_people_write_them() {
        // Guards: the spellings documented in the README and examples.
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_cpu_millis("250m"), Ok(250));
        assert!(parse_cpu_millis("two").is_err());
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("4Gi"), Ok(4 << 30));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1048576"), Ok(1_048_576));
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5x").is_err());
    }
}
