//! Weights on the wire: Kubernetes quantities (TrafficSplit v1alpha1) and non-negative integers
//! (v1alpha2 and later). Both are checked while deserializing, so a bad weight is reported with the
//! exact field it sits in.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// The largest weight that still fits in milli-units as a `u64`.
pub const MAX_WEIGHT_UNITS: u64 = u64::MAX / 1000;

/// A non-negative Kubernetes quantity held exactly in milli-units (`"1"` = 1000, `"500m"` = 500).
///
/// Parsing accepts every quantity form Kubernetes accepts (`"2"`, `"0.5"`, `"500m"`, `"1k"`,
/// `"1Ki"`, `"1e3"`, and bare YAML numbers). Values finer than one milli-unit (`"1u"`) are refused
/// rather than rounded, so ratios stay exact. Serialization writes the canonical short form: whole
/// units as `"3"`, anything else as `"1500m"` (as Kubernetes itself canonicalizes quantities).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Quantity {
    milli: u64,
}

impl Quantity {
    /// A quantity of `milli` thousandths.
    pub fn from_milli(milli: u64) -> Self {
        Self { milli }
    }

    /// The value in thousandths.
    pub fn milli(self) -> u64 {
        self.milli
    }

    /// Parses a Kubernetes quantity string.
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_milli(text).map(Self::from_milli)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.milli.is_multiple_of(1000) {
            write!(f, "{}", self.milli / 1000)
        } else {
            write!(f, "{}m", self.milli)
        }
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QuantityVisitor;
        impl Visitor<'_> for QuantityVisitor {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative Kubernetes quantity such as \"1\" or \"500m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Quantity, E> {
                Quantity::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Quantity, E> {
                Quantity::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Quantity, E> {
                Quantity::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Quantity, E> {
                Quantity::parse(&v.to_string()).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(QuantityVisitor)
    }
}

fn parse_milli(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "must be a non-negative Kubernetes quantity such as \"1\" or \"500m\", got {text:?}"
        )
    };
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    if let Some(magnitude) = unsigned.strip_prefix('-') {
        // "-0" is still zero; every other negative is refused.
        return match parse_milli(magnitude) {
            Ok(0) => Ok(0),
            _ => Err(format!("must not be negative, got {text:?}")),
        };
    }
    let number_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(bad());
    }
    let digits: String = format!("{whole}{fraction}");
    let mantissa: u128 = digits.trim_start_matches('0').parse().unwrap_or(0);
    if digits.len() > 30 {
        return Err(format!("is too large, got {text:?}"));
    }
    // value = mantissa * 10^(-fraction.len()) * multiplier; keep it as numerator / denominator.
    let mut numerator = mantissa
        .checked_mul(1000)
        .ok_or_else(|| format!("is too large, got {text:?}"))?;
    let mut denominator: u128 = 10u128.pow(fraction.len() as u32);
    let decimal_exponent: i32 = match suffix {
        "" => 0,
        "n" => -9,
        "u" => -6,
        "m" => -3,
        "k" => 3,
        "M" => 6,
        "G" => 9,
        "T" => 12,
        "P" => 15,
        "E" => 18,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = "KMGTPE".find(&suffix[..1]).unwrap_or(0) as u32 + 1;
            numerator = numerator
                .checked_mul(1024u128.pow(power))
                .ok_or_else(|| format!("is too large, got {text:?}"))?;
            0
        }
        exponent if exponent.starts_with(['e', 'E']) => exponent[1..]
            .parse::<i32>()
            .ok()
            .filter(|e| e.abs() <= 30)
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if decimal_exponent >= 0 {
        numerator = numerator
            .checked_mul(10u128.pow(decimal_exponent as u32))
            .ok_or_else(|| format!("is too large, got {text:?}"))?;
    } else {
        denominator *= 10u128.pow((-decimal_exponent) as u32);
    }
    if numerator % denominator != 0 {
        return Err(format!(
            "is finer than 1m, the smallest weight step Trellis keeps exactly, got {text:?}"
        ));
    }
    let milli = numerator / denominator;
    u64::try_from(milli)
        .ok()
        .filter(|m| *m <= MAX_WEIGHT_UNITS * 1000)
        .ok_or_else(|| format!("is too large, got {text:?}"))
}

/// A TrafficSplit weight of v1alpha2 and later: a non-negative integer.
///
/// Negative, fractional and non-numeric weights are refused while deserializing with
/// "must be a non-negative integer, got ...". Whole floats (`2.0`) are accepted as integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IntWeight(pub u64);

impl Serialize for IntWeight {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for IntWeight {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntWeightVisitor;
        fn checked<E: de::Error>(v: u64) -> Result<IntWeight, E> {
            if v > MAX_WEIGHT_UNITS {
                Err(E::custom(format!(
                    "is too large (at most {MAX_WEIGHT_UNITS}), got {v}"
                )))
            } else {
                Ok(IntWeight(v))
            }
        }
        impl Visitor<'_> for IntWeightVisitor {
            type Value = IntWeight;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntWeight, E> {
                checked(v)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntWeight, E> {
                u64::try_from(v)
                    .map_err(|_| not_integer(v))
                    .and_then(checked)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<IntWeight, E> {
                if v.fract() == 0.0 && v >= 0.0 && v <= MAX_WEIGHT_UNITS as f64 {
                    Ok(IntWeight(v as u64))
                } else {
                    Err(not_integer(v))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntWeight, E> {
                Err(not_integer(format!("{v:?}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<IntWeight, E> {
                Err(not_integer(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<IntWeight, E> {
                Err(not_integer("null"))
            }
        }
        fn not_integer<E: de::Error>(got: impl fmt::Display) -> E {
            E::custom(format!("must be a non-negative integer, got {got}"))
        }
        deserializer.deserialize_any(IntWeightVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_exactly() {
        let cases = [
            ("1", 1000),
            ("500m", 500),
            ("0.5", 500),
            ("+2", 2000),
            ("1k", 1_000_000),
            ("1Ki", 1_024_000),
            ("1e3", 1_000_000),
            ("1500000u", 1500),
            ("0", 0),
            ("-0", 0),
            (".25", 250),
        ];
        for (text, milli) in cases {
            assert_eq!(
                Quantity::parse(text),
                Ok(Quantity::from_milli(milli)),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_quantities_are_refused_with_reason() {
        assert!(Quantity::parse("-1").unwrap_err().contains("negative"));
        assert!(Quantity::parse("1u").unwrap_err().contains("finer than 1m"));
        assert!(
            Quantity::parse("abc")
                .unwrap_err()
                .contains("Kubernetes quantity")
        );
        assert!(Quantity::parse("1.2.3").is_err());
        assert!(Quantity::parse("1E").unwrap_err().contains("too large"));
        assert!(Quantity::parse("").is_err());
    }

    #[test]
    fn quantities_print_canonically() {
        assert_eq!(Quantity::parse("1000m").unwrap().to_string(), "1");
        assert_eq!(Quantity::parse("0.5").unwrap().to_string(), "500m");
    }

    #[test]
    fn int_weights_refuse_negatives_and_fractions() {
        let err = |v: serde_json::Value| {
            serde_json::from_value::<IntWeight>(v)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(serde_json::json!(-5)),
            "must be a non-negative integer, got -5"
        );
        assert_eq!(
            err(serde_json::json!(1.5)),
            "must be a non-negative integer, got 1.5"
        );
        assert_eq!(
            err(serde_json::json!("5")),
            "must be a non-negative integer, got \"5\""
        );
        assert_eq!(
            serde_json::from_value::<IntWeight>(serde_json::json!(2.0)).unwrap(),
            IntWeight(2)
        );
    }
}
