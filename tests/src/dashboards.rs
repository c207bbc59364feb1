//! The Grafana dashboards in `deploy/monitoring/dashboards/`, read the way the tests and the
//! dashboard plots need them: every panel (rows' nested panels included) with its title, unit,
//! description and PromQL targets, and the substitution of Grafana's variables by the values a
//! [`crate::prometheus::Prometheus`] of the tests answers to.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The variables a dashboard query may use, and what they stand for against the tests'
/// Prometheus (job names as in [`crate::prometheus::stack_targets`], 1 s scrapes).
pub const VARIABLES: [(&str, &str); 5] = [
    ("$auth_job", "auth-service"),
    ("$referral_job", "referral-service"),
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "5m"),
];

pub struct Dashboard {
    pub path: PathBuf,
    pub title: String,
    /// Panels in the order Grafana lays them out, rows included (`kind == "row"`).
    pub panels: Vec<Panel>,
}

pub struct Panel {
    /// Grafana's panel type: `timeseries`, `stat`, `row`, ...
    pub kind: String,
    pub title: String,
    /// `fieldConfig.defaults.unit`, if set.
    pub unit: Option<String>,
    pub description: String,
    pub targets: Vec<Query>,
}

pub struct Query {
    /// As written in the dashboard, variables unsubstituted.
    pub expr: String,
    pub legend: String,
}

impl Dashboard {
    /// Every `*.json` in `dir`, sorted by file name.
    pub fn load_all(dir: &Path) -> Result<Vec<Dashboard>, String> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|err| format!("{}: {err}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        paths.sort();
        paths.iter().map(|path| Self::load(path)).collect()
    }

    pub fn load(path: &Path) -> Result<Dashboard, String> {
        let text =
            std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|err| format!("{}: not JSON: {err}", path.display()))?;
        let mut panels = Vec::new();
        collect_panels(&json["panels"], &mut panels);
        Ok(Dashboard {
            path: path.to_owned(),
            title: json["title"].as_str().unwrap_or_default().to_owned(),
            panels,
        })
    }

    /// The file name without `.json`.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Panel {
    pub fn is_row(&self) -> bool {
        self.kind == "row"
    }
}

/// Panels in order; a collapsed row keeps its panels in its own `panels`, which follow it.
fn collect_panels(panels: &Value, into: &mut Vec<Panel>) {
    for panel in panels.as_array().map(Vec::as_slice).unwrap_or_default() {
        let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
        into.push(Panel {
            kind: text(&panel["type"]),
            title: text(&panel["title"]),
            unit: panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .map(str::to_owned),
            description: text(&panel["description"]),
            targets: panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|target| Query {
                    expr: text(&target["expr"]),
                    legend: text(&target["legendFormat"]),
                })
                .collect(),
        });
        collect_panels(&panel["panels"], into);
    }
}

/// `expr` with the dashboard variables replaced by the values in [`VARIABLES`].
pub fn substitute(expr: &str) -> String {
    substitute_with(expr, &VARIABLES)
}

/// `expr` with each variable of `values` (`$name` or `${name}`) replaced, longest names first so
/// that no name is taken for the start of a longer one.
pub fn substitute_with(expr: &str, values: &[(&str, &str)]) -> String {
    let mut variables = values.to_vec();
    variables.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    variables
        .iter()
        .fold(expr.to_owned(), |expr, (name, value)| {
            expr.replace(&format!("${{{}}}", &name[1..]), value)
                .replace(name, value)
        })
}

/// The variables `expr` uses (`$name` or `${name}`) that are not in [`VARIABLES`].
pub fn unknown_variables(expr: &str) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let braced = rest.starts_with('{');
        let name_start = usize::from(braced);
        let name: String = rest[name_start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !VARIABLES.iter().any(|(known, _)| known[1..] == name) {
            unknown.push(format!(
                "${}",
                if braced { format!("{{{name}}}") } else { name }
            ));
        }
    }
    unknown
}

/// A legend from Grafana's `legendFormat` (`{{label}}` placeholders) and a series' labels; the
/// labels themselves when there is no format.
pub fn legend(format: &str, labels: &std::collections::BTreeMap<String, String>) -> String {
    if format.is_empty() {
        return labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
    }
    let mut text = format.to_owned();
    while let Some(start) = text.find("{{") {
        let Some(len) = text[start..].find("}}") else {
            break;
        };
        let label = text[start + 2..start + len].trim();
        let value = labels.get(label).cloned().unwrap_or_default();
        text.replace_range(start..start + len + 2, &value);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_substituted_and_strangers_named() {
        assert_eq!(
            substitute(
                r#"rate(x{job=~"$auth_job|${referral_job}"}[$__rate_interval]) + y[$__range]"#
            ),
            r#"rate(x{job=~"auth-service|referral-service"}[1m]) + y[5m]"#
        );
        assert!(unknown_variables(r#"x{job=~"$auth_job|${referral_job}"}[$__range]"#).is_empty());
        assert_eq!(
            unknown_variables(r#"x{pod=~"$pod"}[${__rate}]"#),
            ["$pod", "${__rate}"]
        );
    }

    #[test]
    fn legends_fill_labels() {
        let labels = [("job", "auth-service"), ("grpc_code", "Unavailable")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        assert_eq!(
            legend("{{job}} {{ grpc_code }}", &labels),
            "auth-service Unavailable"
        );
        assert_eq!(
            legend("", &labels),
            "grpc_code=Unavailable, job=auth-service"
        );
    }
}
