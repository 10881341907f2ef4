//! The conformance table: scenario x platform, `pass`, `FAIL` or `skip`, followed by the reason
//! of every failure and skip (and what each pass saw), as printed by the conformance test.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::scenarios::Outcome;

/// Outcomes per (scenario, platform), scenarios and platforms in the order they were added.
#[derive(Debug, Default)]
pub struct Table {
    scenarios: Vec<String>,
    platforms: Vec<String>,
    cells: BTreeMap<(String, String), Outcome>,
}

impl Table {
    pub fn add(&mut self, scenario: &str, platform: &str, outcome: Outcome) {
        if !self.scenarios.iter().any(|s| s == scenario) {
            self.scenarios.push(scenario.to_owned());
        }
        if !self.platforms.iter().any(|p| p == platform) {
            self.platforms.push(platform.to_owned());
        }
        self.cells
            .insert((scenario.to_owned(), platform.to_owned()), outcome);
    }

    /// Every failure as `scenario @ platform: reason`.
    pub fn failures(&self) -> Vec<String> {
        self.cells
            .iter()
            .filter_map(|((s, p), o)| match o {
                Outcome::Fail(why) => Some(format!("{s} @ {p}: {why}")),
                _ => None,
            })
            .collect()
    }

    /// The table, then one line per non-pass cell with its reason, then what the passes saw.
    pub fn render(&self, details: bool) -> String {
        let width = self
            .scenarios
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(8)
            .max(8);
        let mut out = format!("{:width$}", "scenario");
        for p in &self.platforms {
            let _ = write!(out, " | {:^w$}", p, w = p.len().max(4));
        }
        out.push('\n');
        out.push_str(&"-".repeat(out.len() - 1));
        out.push('\n');
        for s in &self.scenarios {
            let _ = write!(out, "{s:width$}");
            for p in &self.platforms {
                let cell = self
                    .cells
                    .get(&(s.clone(), p.clone()))
                    .map_or("-".to_owned(), ToString::to_string);
                let _ = write!(out, " | {:^w$}", cell, w = p.len().max(4));
            }
            out.push('\n');
        }
        let (mut skips, mut fails, mut passes) = (Vec::new(), Vec::new(), Vec::new());
        for ((s, p), o) in &self.cells {
            match o {
                Outcome::Skip(why) => skips.push((p, s, why)),
                Outcome::Fail(why) => fails.push((p, s, why)),
                Outcome::Pass(seen) => passes.push((p, s, seen)),
            }
        }
        // One skip line per platform when every scenario there was skipped for one reason.
        let mut shown = std::collections::BTreeSet::new();
        for (p, _, why) in &skips {
            if shown.insert((*p, *why)) {
                let _ = writeln!(out, "skip {p}: {why}");
            }
        }
        for (p, s, why) in &fails {
            let _ = writeln!(out, "FAIL {s} @ {p}: {why}");
        }
        if details {
            for (p, s, seen) in &passes {
                let _ = writeln!(out, "pass {s} @ {p}: {seen}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cells_and_reasons() {
        let mut t = Table::default();
        t.add("a", "file", Outcome::Pass("b=50".into()));
        t.add("a", "consul", Outcome::Fail("no answer".into()));
        t.add("a", "kubernetes-real", Outcome::Skip("unset".into()));
        t.add("bb", "kubernetes-real", Outcome::Skip("unset".into()));
        let text = t.render(true);
        assert!(
            text.starts_with("scenario | file | consul | kubernetes-real"),
            "{text}"
        );
        assert!(
            text.contains("a        | pass |  FAIL  |      skip      "),
            "{text}"
        );
        assert!(
            text.contains("bb       |  -   |   -    |      skip"),
            "{text}"
        );
        assert_eq!(
            text.matches("skip kubernetes-real: unset").count(),
            1,
            "{text}"
        );
        assert!(text.contains("FAIL a @ consul: no answer"), "{text}");
        assert!(text.contains("pass a @ file: b=50"), "{text}");
        assert_eq!(t.failures(), ["a @ consul: no answer"]);
    }
}
