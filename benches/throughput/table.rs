//! The results table: one row per figure (scenario, figure, baseline, ratio,
//! target, result), printed as Markdown, and the statistics behind the figures.

use std::time::Duration;

use anyhow::Result;

#[derive(Default)]
pub(super) struct Table {
    pub(super) rows: Vec<Row>,
}

pub(super) struct Row {
    pub(super) scenario: String,
    pub(super) figure: String,
    pub(super) baseline: String,
    pub(super) ratio: String,
    pub(super) target: String,
    pub(super) result: &'static str,
}

impl Row {
    /// A figure that must be at least `target`.
    pub(super) fn at_least(
        scenario: &str,
        value: f64,
        unit: &str,
        target: f64,
        decimals: usize,
    ) -> Row {
        Row {
            scenario: scenario.to_owned(),
            figure: format!("{value:.decimals$} {unit}"),
            baseline: "-".into(),
            ratio: "-".into(),
            target: format!(">= {target} {unit}"),
            result: pass_fail(value >= target),
        }
    }

    /// A figure that must stay below (`ms`) or at most (`MiB`, `x`) `target`.
    pub(super) fn at_most(
        scenario: &str,
        value: f64,
        unit: &str,
        target: f64,
        decimals: usize,
    ) -> Row {
        // Latencies have strict targets ("< 50 ms"), memory inclusive ones.
        let (relation, ok) = if unit == "ms" {
            ("<", value < target)
        } else {
            ("<=", value <= target)
        };
        Row {
            scenario: scenario.to_owned(),
            figure: format!("{value:.decimals$} {unit}"),
            baseline: "-".into(),
            ratio: "-".into(),
            target: format!("{relation} {target} {unit}"),
            result: pass_fail(ok),
        }
    }

    /// A figure reported for information, without a target.
    pub(super) fn report(scenario: &str, figure: String) -> Row {
        Row {
            scenario: scenario.to_owned(),
            figure,
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            result: "-",
        }
    }

    /// A scenario that could not be measured.
    pub(super) fn error(scenario: &str, target: &str, error: &anyhow::Error) -> Row {
        eprintln!("{scenario}: FAILED: {error:#}");
        let mut message = format!("error: {error:#}");
        if message.chars().count() > 160 {
            message = message.chars().take(157).chain("...".chars()).collect();
        }
        Row {
            scenario: scenario.to_owned(),
            figure: message,
            baseline: "-".into(),
            ratio: "-".into(),
            target: target.to_owned(),
            result: "FAIL",
        }
    }
}

pub(super) fn pass_fail(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// A baseline speed, or why there is none.
pub(super) type Baseline = Result<Named, String>;

/// A baseline speed and what it measured.
pub(super) struct Named {
    pub(super) label: &'static str,
    pub(super) value: f64,
}

impl Table {
    pub(super) fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// A speed whose target is a minimum ratio to `baseline`.
    pub(super) fn speed(
        &mut self,
        scenario: &str,
        value: f64,
        unit: &str,
        baseline: &Baseline,
        min: f64,
    ) {
        let figure = format!("{value:.1} {unit}");
        let target = format!("ratio >= {min}");
        let row = match baseline {
            Ok(base) => Row {
                scenario: scenario.to_owned(),
                figure,
                baseline: format!("{}: {:.1} {unit}", base.label, base.value),
                ratio: format!("{:.2}", value / base.value),
                target,
                result: pass_fail(value / base.value >= min),
            },
            Err(reason) => Row {
                scenario: scenario.to_owned(),
                figure,
                baseline: format!("n/a ({reason})"),
                ratio: "n/a".into(),
                target,
                result: "FAIL",
            },
        };
        self.rows.push(row);
    }

    /// Prints the rows as a Markdown table, columns padded for the terminal.
    pub(super) fn print(&self) {
        let header = [
            "scenario", "figure", "baseline", "ratio", "target", "result",
        ];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    &r.scenario,
                    &r.figure,
                    &r.baseline,
                    &r.ratio,
                    &r.target,
                    &r.result.to_owned(),
                ]
                .map(|cell| cell.replace('|', "\\|"))
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[&str]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            println!("| {} |", padded.join(" | "));
        };
        line(&header);
        let rules: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        line(&rules.iter().map(String::as_str).collect::<Vec<_>>());
        for row in &cells {
            line(&row.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

pub(super) fn format_mib(mib: f64) -> String {
    format!("{mib:.1} MiB")
}

/// The median over runs of one figure of each run.
pub(super) fn median_of<T>(runs: &[T], figure: impl Fn(&T) -> f64) -> f64 {
    median(runs.iter().map(figure).collect())
}

pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The nearest-rank percentile `p` (0 to 100) of `values`.
pub(super) fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

pub(super) fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}
