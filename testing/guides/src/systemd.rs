//! What systemd would run for a unit: its `[Service]` settings (continuation lines joined), its
//! `EnvironmentFile=`, and its `ExecStart=` with specifiers (`%i` the instance, `%d` the
//! credentials directory, `%%`) and environment variables expanded as `systemd.service(5)` says:
//! `${VAR}` inside a word is replaced by the value (one word), a word that is exactly `$VAR` is
//! replaced by the value split at whitespace (zero or more words).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

/// A parsed unit file: `section -> [(key, value)]` in file order (keys may repeat).
#[derive(Debug, Clone)]
pub struct Unit {
    sections: BTreeMap<String, Vec<(String, String)>>,
}

impl Unit {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut current: Option<String> = None;
        let mut pending = String::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if pending.is_empty() && line.starts_with('[') && line.ends_with(']') {
                current = Some(line[1..line.len() - 1].to_owned());
                continue;
            }
            // A trailing backslash continues the line; systemd joins with a space.
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let entry = std::mem::take(&mut pending);
            let Some((key, value)) = entry.split_once('=') else {
                bail!("line {}: not KEY=VALUE: {entry:?}", n + 1);
            };
            let section = current
                .clone()
                .with_context(|| format!("line {}: setting outside a section", n + 1))?;
            sections
                .entry(section)
                .or_default()
                .push((key.trim().to_owned(), value.trim().to_owned()));
        }
        Ok(Self { sections })
    }

    /// Every value of `key` in `section`, in order.
    pub fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.sections
            .get(section)
            .into_iter()
            .flatten()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of `key` in `[Service]`.
    pub fn service(&self, key: &str) -> anyhow::Result<&str> {
        match self.values("Service", key).as_slice() {
            [one] => Ok(one),
            [] => bail!("the unit has no {key}="),
            _ => bail!("the unit has several {key}="),
        }
    }
}

/// Specifiers: `%i` (instance), `%d` (credentials directory), `%%`.
pub fn specifiers(text: &str, instance: &str, credentials: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('i') => out.push_str(instance),
            Some('d') => out.push_str(credentials),
            Some('%') => out.push('%'),
            other => bail!("specifier %{} is not supported here", other.unwrap_or(' ')),
        }
    }
    Ok(out)
}

/// An `EnvironmentFile=`: `KEY=VALUE` lines; `#` and `;` lines are comments; surrounding quotes
/// are removed.
pub fn environment_file(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut vars = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("line {}: not KEY=VALUE: {line:?}", n + 1))?;
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
            .unwrap_or(value);
        vars.push((key.trim().to_owned(), value.to_owned()));
    }
    Ok(vars)
}

/// A command line (`ExecStart=` after specifiers) as the words systemd runs, with `env`.
pub fn command_line(line: &str, env: &[(String, String)]) -> anyhow::Result<Vec<String>> {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let braced = regex::Regex::new(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}").expect("valid regex");
    let mut words = Vec::new();
    for word in line.split_whitespace() {
        if word.contains(['"', '\'']) {
            bail!("quoted words are not supported here: {word:?}");
        }
        if let Some(name) = word
            .strip_prefix('$')
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            words.extend(lookup(name).split_whitespace().map(str::to_owned));
            continue;
        }
        words.push(
            braced
                .replace_all(word, |c: &regex::Captures<'_>| lookup(&c[1]))
                .into_owned(),
        );
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_start_expands_like_systemd() {
        let unit = Unit::parse(
            "# c\n[Unit]\nDescription=x\n[Service]\nEnvironmentFile=/etc/x/%i.env\nExecStart=/bin/p \\\n    --a ${A} \\\n    --b=x${B}y --t %d/token $ARGS\n",
        )
        .unwrap();
        assert_eq!(unit.service("EnvironmentFile").unwrap(), "/etc/x/%i.env");
        let line = specifiers(unit.service("ExecStart").unwrap(), "web", "/creds").unwrap();
        let env = environment_file(
            "# comment\nA=1.2.3.4:5\nB=\"mid\"\nARGS=--in 0.0.0.0:1=127.0.0.1:2   --out 127.0.0.1:3\n",
        )
        .unwrap();
        assert_eq!(
            command_line(&line, &env).unwrap(),
            [
                "/bin/p",
                "--a",
                "1.2.3.4:5",
                "--b=xmidy",
                "--t",
                "/creds/token",
                "--in",
                "0.0.0.0:1=127.0.0.1:2",
                "--out",
                "127.0.0.1:3"
            ]
        );
        assert!(specifiers("%n", "x", "y").is_err());
        assert_eq!(specifiers("100%%", "x", "y").unwrap(), "100%");
        assert!(unit.service("User").is_err());
    }
}
