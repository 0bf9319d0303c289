//! Nagios plugin output: the message, and performance data turned into metrics.
//!
//! The format is the Nagios Plugin Development Guidelines' (monitoring-plugins.org,
//! "Plugin Output" and "Performance data"):
//!
//! ```text
//! DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968
//! / 15272 MB (77%);                              <- long text
//! /boot 68 MB (69%); | /boot=68MB;88;93;0;98     <- the long text's `|`: perfdata from here
//! /home=69357MB;253404;253409;0;253414           <- perfdata, to the end
//! ```
//!
//! - the first line's text before `|` is the message; after it, performance data;
//! - the lines after it are long text up to a line holding `|`; the text after that `|`
//!   and every line after it are performance data;
//! - one item is `'label'=value[UOM];[warn];[crit];[min];[max]`, items separated by
//!   spaces. A label with spaces is in single quotes, a quote inside it doubled (`''`); an
//!   unquoted label runs to the `=`. `value` is a number (`[-0-9.]`, an exponent is
//!   tolerated) or `U` (could not be determined); trailing empty fields may be left out.
//!
//! Units are normalised to the base unit in the metric's name ([`Family`]):
//! `s`/`ms`/`us` → seconds, `%` → a ratio (0–1, as every vigil ratio), `B`/`KB`/`MB`/`GB`/
//! `TB` → bytes (powers of 1024, as the contract's sizes and the monitoring plugins
//! themselves count; `kB` and the IEC spellings are accepted too), `c` → a counter; no
//! unit → a plain number. An item with any other unit is kept as a plain number with its
//! unit in a `uom` label, rather than converted by a guess.
//!
//! The parser never panics (property-tested) and bounds what it returns: at most
//! [`MAX_ITEMS`] items, labels cut at [`MAX_LABEL_CHARS`], a label seen twice kept once.
//! An item it cannot read is counted in [`Perfdata::skipped`], never a reason to lose the
//! others.

/// Most performance data items kept from one run: each is a series on `/metrics`, and a
/// plugin that prints thousands must not swell every scrape.
pub const MAX_ITEMS: usize = 64;
/// Labels are cut to this many characters (they become Prometheus label values).
pub const MAX_LABEL_CHARS: usize = 128;

/// A plugin's stdout, split.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PluginOutput {
    /// The first line's text before `|`, trimmed (may be empty).
    pub message: String,
    /// The performance data of the first line and of the long text.
    pub perfdata: Perfdata,
}

/// The items read, and how many were not.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Perfdata {
    /// In order of appearance; labels unique.
    pub items: Vec<PerfItem>,
    /// Items dropped: unreadable, a label seen before, or beyond [`MAX_ITEMS`].
    pub skipped: usize,
}

/// One performance data item.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfItem {
    /// The plugin's label, unquoted (at most [`MAX_LABEL_CHARS`] characters).
    pub label: String,
    /// The value as written; `None` for `U`.
    pub value: Option<f64>,
    /// The unit of measure as written (`""` when none).
    pub uom: String,
    /// The warning range as written (Nagios range syntax, e.g. `10`, `@5:10`, `~:5`).
    pub warn: Option<String>,
    /// The critical range as written.
    pub crit: Option<String>,
    /// The minimum, in `uom`.
    pub min: Option<f64>,
    /// The maximum, in `uom`.
    pub max: Option<f64>,
}

/// The base unit a value is normalised to; one metric family per unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Seconds (`s`, `ms`, `us`).
    Seconds,
    /// Bytes (`B`, `KB`, `MB`, `GB`, `TB`, powers of 1024).
    Bytes,
    /// A ratio 0–1 (`%`).
    Ratio,
    /// A counter (`c`).
    Counter,
    /// A plain number: no unit, or one not listed in the guidelines (kept in `uom`).
    Plain,
}

impl PerfItem {
    /// The value in its family's base unit: `(family, value)`; `None` for `U`.
    pub fn normalised(&self) -> Option<(Family, f64)> {
        let v = self.value?;
        let (family, mul, div) = unit_scale(&self.uom);
        Some((family, v * mul / div))
    }
}

/// The family of a unit as written, and its factor to the base unit as `(family,
/// multiplier, divisor)`: sub-units divide (`250 / 1000`), as `1e-3` has no exact binary
/// form and `0.25` should come out as `0.25`. Unit names are case-sensitive (`ms` is not
/// `Ms`), except that `kB` is accepted beside `KB`.
pub fn unit_scale(uom: &str) -> (Family, f64, f64) {
    const KI: f64 = 1024.0;
    match uom {
        "s" => (Family::Seconds, 1.0, 1.0),
        "ms" => (Family::Seconds, 1.0, 1e3),
        "us" | "µs" => (Family::Seconds, 1.0, 1e6),
        "ns" => (Family::Seconds, 1.0, 1e9),
        "%" => (Family::Ratio, 1.0, 100.0),
        "B" => (Family::Bytes, 1.0, 1.0),
        "KB" | "kB" | "KiB" => (Family::Bytes, KI, 1.0),
        "MB" | "MiB" => (Family::Bytes, KI * KI, 1.0),
        "GB" | "GiB" => (Family::Bytes, KI * KI * KI, 1.0),
        "TB" | "TiB" => (Family::Bytes, KI * KI * KI * KI, 1.0),
        "c" => (Family::Counter, 1.0, 1.0),
        _ => (Family::Plain, 1.0, 1.0),
    }
}

/// Splits a plugin's stdout into its message and performance data.
pub fn parse_plugin_output(text: &str) -> PluginOutput {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let (message, first_perf) = match first.split_once('|') {
        Some((m, p)) => (m, p),
        None => (first, ""),
    };
    let mut perf = String::from(first_perf);
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            perf.push(' ');
            perf.push_str(line);
        } else if let Some((_, p)) = line.split_once('|') {
            in_perf = true;
            perf.push(' ');
            perf.push_str(p);
        }
    }
    PluginOutput {
        message: message.trim().to_string(),
        perfdata: parse_perfdata(&perf),
    }
}

/// Parses performance data items separated by whitespace.
pub fn parse_perfdata(s: &str) -> Perfdata {
    let mut out = Perfdata::default();
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let (item, after) = next_item(rest);
        rest = after;
        match item {
            Some(i) if out.items.iter().any(|o| o.label == i.label) => out.skipped += 1,
            Some(_) if out.items.len() >= MAX_ITEMS => out.skipped += 1,
            Some(i) => out.items.push(i),
            None => out.skipped += 1,
        }
    }
    out
}

/// Reads one item from the start of `s` (not starting with whitespace); returns it (or
/// `None` when it is unreadable) and the text after it. Always consumes at least one
/// character, so the caller's loop ends.
fn next_item(s: &str) -> (Option<PerfItem>, &str) {
    let (label, after_label) = if let Some(quoted) = s.strip_prefix('\'') {
        match quoted_label(quoted) {
            Some(x) => x,
            // Unterminated quote: nothing after it can be delimited with confidence.
            None => return (None, ""),
        }
    } else {
        let end = s
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(s.len());
        (s[..end].to_string(), &s[end..])
    };
    let Some(spec_start) = after_label.strip_prefix('=') else {
        return (None, skip_token(after_label));
    };
    let end = spec_start
        .find(char::is_whitespace)
        .unwrap_or(spec_start.len());
    let (spec, rest) = spec_start.split_at(end);
    if label.is_empty() {
        return (None, rest);
    }
    (parse_spec(label, spec), rest)
}

/// The text after the current token (up to the next whitespace).
fn skip_token(s: &str) -> &str {
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    &s[end..]
}

/// A single-quoted label after its opening quote: `''` is a quote; returns the label and
/// the text after the closing quote, `None` when it is never closed.
fn quoted_label(s: &str) -> Option<(String, &str)> {
    let mut label = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '\'' {
            label.push(c);
            continue;
        }
        if let Some((_, '\'')) = chars.peek() {
            chars.next();
            label.push('\'');
            continue;
        }
        // `i` is the closing quote's byte index; a quote is one byte.
        return Some((label, &s[i + 1..]));
    }
    None
}

/// `value[UOM];warn;crit;min;max` for `label`.
fn parse_spec(label: String, spec: &str) -> Option<PerfItem> {
    let mut fields = spec.split(';');
    let value_uom = fields.next().unwrap_or("");
    let (value, uom) = if let Some(uom) = value_uom.strip_prefix('U') {
        (None, uom)
    } else {
        let (num, uom) = split_number(value_uom);
        (Some(parse_number(num)?), uom)
    };
    // The unit is letters or `%` (`MB`, `us`, `µs`, `c`); anything else is not a unit.
    if uom != "%" && !uom.chars().all(char::is_alphabetic) {
        return None;
    }
    let text = |f: Option<&str>| f.map(str::trim).filter(|t| !t.is_empty()).map(String::from);
    let warn = text(fields.next());
    let crit = text(fields.next());
    // min and max are plain numbers in `uom`; one that is not stays unknown rather than
    // costing the value.
    let min = fields.next().and_then(|f| parse_number(f.trim()));
    let max = fields.next().and_then(|f| parse_number(f.trim()));
    Some(PerfItem {
        label: cut(&label, MAX_LABEL_CHARS),
        value,
        uom: uom.to_string(),
        warn,
        crit,
        min,
        max,
    })
}

/// Splits `12.5e-3ms` into the number (`12.5e-3`) and the unit (`ms`): the number is
/// `[-+0-9.]` characters, then an exponent only when `e`/`E` is followed by digits.
fn split_number(s: &str) -> (&str, &str) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && matches!(b[i], b'0'..=b'9' | b'.' | b'-' | b'+') {
        i += 1;
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        let mut j = i + 1;
        if j < b.len() && matches!(b[j], b'-' | b'+') {
            j += 1;
        }
        let digits = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > digits {
            i = j;
        }
    }
    // `i` only ever advanced over ASCII bytes, so it is a char boundary.
    s.split_at(i)
}

/// A finite number, or `None`.
fn parse_number(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// `s` cut to `max` characters.
fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(label: &str, value: f64, uom: &str) -> PerfItem {
        PerfItem {
            label: label.into(),
            value: Some(value),
            uom: uom.into(),
            warn: None,
            crit: None,
            min: None,
            max: None,
        }
    }

    #[test]
    fn check_load_as_debian_prints_it() {
        let o = parse_plugin_output(
            "LOAD OK - total load average: 2.39, 2.59, 2.07|load1=2.390;5.000;10.000;0; \
             load5=2.590;4.000;8.000;0; load15=2.070;3.000;6.000;0; \n",
        );
        assert_eq!(o.message, "LOAD OK - total load average: 2.39, 2.59, 2.07");
        assert_eq!(o.perfdata.skipped, 0);
        let labels: Vec<_> = o.perfdata.items.iter().map(|i| i.label.as_str()).collect();
        assert_eq!(labels, ["load1", "load5", "load15"]);
        let l1 = &o.perfdata.items[0];
        assert_eq!(l1.value, Some(2.39));
        assert_eq!(l1.warn.as_deref(), Some("5.000"));
        assert_eq!(l1.crit.as_deref(), Some("10.000"));
        assert_eq!((l1.min, l1.max), (Some(0.0), None));
        assert_eq!(l1.normalised(), Some((Family::Plain, 2.39)));
    }

    #[test]
    fn check_disk_in_bytes() {
        let o = parse_plugin_output(
            "DISK OK - free space: / 60310MiB (64% inode=97%);| \
             /=34332475392B;216442024755;243497277849;0;270552530944\n",
        );
        assert_eq!(
            o.message,
            "DISK OK - free space: / 60310MiB (64% inode=97%);"
        );
        let i = &o.perfdata.items[0];
        assert_eq!(i.label, "/");
        assert_eq!(i.normalised(), Some((Family::Bytes, 34_332_475_392.0)));
        assert_eq!(i.max, Some(270_552_530_944.0));
    }

    #[test]
    fn the_guidelines_multi_line_example() {
        let text = "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968\n\
                    / 15272 MB (77%);\n\
                    /boot 68 MB (69%);\n\
                    /home 69357 MB (27%);\n\
                    /var/log 819 MB (84%); | /boot=68MB;88;93;0;98\n\
                    /home=69357MB;253404;253409;0;253414 \n\
                    /var/log=818MB;970;975;0;980\n";
        let o = parse_plugin_output(text);
        assert_eq!(o.message, "DISK OK - free space: / 3326 MB (56%);");
        let got: Vec<_> = o
            .perfdata
            .items
            .iter()
            .map(|i| (i.label.as_str(), i.normalised()))
            .collect();
        let mib = |n: f64| Some((Family::Bytes, n * 1024.0 * 1024.0));
        assert_eq!(
            got,
            [
                ("/", mib(2643.0)),
                ("/boot", mib(68.0)),
                ("/home", mib(69357.0)),
                ("/var/log", mib(818.0)),
            ]
        );
        assert_eq!(o.perfdata.skipped, 0);
    }

    #[test]
    fn long_text_without_a_bar_has_no_perfdata() {
        let o = parse_plugin_output("OK\nline two\nline = three\n");
        assert_eq!(o.message, "OK");
        assert!(o.perfdata.items.is_empty());
        assert_eq!(o.perfdata.skipped, 0);
    }

    #[test]
    fn units_are_normalised() {
        let o = parse_perfdata("a=1s b=250ms c=40us d=50% e=2KB f=1.5GB g=3c h=7 i=9TB j=2kB");
        let got: Vec<_> = o.items.iter().map(|i| i.normalised().unwrap()).collect();
        assert_eq!(
            got,
            [
                (Family::Seconds, 1.0),
                (Family::Seconds, 0.25),
                (Family::Seconds, 40e-6),
                (Family::Ratio, 0.5),
                (Family::Bytes, 2048.0),
                (Family::Bytes, 1.5 * 1024.0 * 1024.0 * 1024.0),
                (Family::Counter, 3.0),
                (Family::Plain, 7.0),
                (Family::Bytes, 9.0 * 1024f64.powi(4)),
                (Family::Bytes, 2048.0),
            ]
        );
    }

    #[test]
    fn an_unlisted_unit_is_kept_plain_with_its_name() {
        let o = parse_perfdata("rate=12.5Bps temp=40C");
        assert_eq!(o.items[0].uom, "Bps");
        assert_eq!(o.items[0].normalised(), Some((Family::Plain, 12.5)));
        assert_eq!(o.items[1].normalised(), Some((Family::Plain, 40.0)));
    }

    #[test]
    fn quoted_labels_keep_spaces_equals_and_doubled_quotes() {
        let o = parse_perfdata("'free space /var'=10% 'it''s'=1 'a=b'=2 'é ü'=3ms");
        let labels: Vec<_> = o.items.iter().map(|i| i.label.as_str()).collect();
        assert_eq!(labels, ["free space /var", "it's", "a=b", "é ü"]);
        assert_eq!(o.items[0].normalised(), Some((Family::Ratio, 0.1)));
        assert_eq!(o.skipped, 0);
    }

    #[test]
    fn undetermined_values_and_omitted_fields() {
        let o = parse_perfdata("x=U;1;2 y=U z=5;;;0;100 w=-3.5e2");
        assert_eq!(o.items[0].value, None);
        assert_eq!(o.items[0].warn.as_deref(), Some("1"));
        assert_eq!(o.items[1].normalised(), None);
        assert_eq!(o.items[2].warn, None);
        assert_eq!((o.items[2].min, o.items[2].max), (Some(0.0), Some(100.0)));
        assert_eq!(o.items[3].value, Some(-350.0));
        assert_eq!(o.skipped, 0);
    }

    #[test]
    fn nagios_ranges_are_kept_as_written() {
        let o = parse_perfdata("t=3;@10:20;~:5;;");
        assert_eq!(o.items[0].warn.as_deref(), Some("@10:20"));
        assert_eq!(o.items[0].crit.as_deref(), Some("~:5"));
    }

    #[test]
    fn garbage_is_skipped_and_the_rest_kept() {
        let o = parse_perfdata("good=1 noequals bad=abc =5 'unterm=3 never=reached");
        assert_eq!(o.items, [item("good", 1.0, "")]);
        // noequals, bad=abc, =5, and the unterminated quote (which swallows the rest).
        assert_eq!(o.skipped, 4);
        let o = parse_perfdata("a=1,5 b=1.2.3 c=1e d=5%% e=2 f=nan g=inf h=4%s");
        // "1e" is a value 1 with unit "e": not a guideline unit, but a unit-shaped one.
        assert_eq!(o.items, [item("c", 1.0, "e"), item("e", 2.0, "")]);
        assert_eq!(o.skipped, 6);
    }

    #[test]
    fn duplicates_and_items_beyond_the_cap_are_counted() {
        let o = parse_perfdata("a=1 a=2");
        assert_eq!(o.items, [item("a", 1.0, "")]);
        assert_eq!(o.skipped, 1);
        let many: String = (0..MAX_ITEMS + 10).map(|i| format!("l{i}=1 ")).collect();
        let o = parse_perfdata(&many);
        assert_eq!(o.items.len(), MAX_ITEMS);
        assert_eq!(o.skipped, 10);
        let long = format!("'{}'=1", "x".repeat(1000));
        assert_eq!(parse_perfdata(&long).items[0].label.len(), MAX_LABEL_CHARS);
    }

    #[test]
    fn empty_and_bar_only_outputs() {
        assert_eq!(parse_plugin_output(""), PluginOutput::default());
        let o = parse_plugin_output("|");
        assert_eq!(o.message, "");
        assert!(o.perfdata.items.is_empty());
        let o = parse_plugin_output(" | x=1 | y=2");
        // A second bar on the first line is no separator, just an unreadable item.
        assert_eq!(o.perfdata.items, [item("x", 1.0, ""), item("y", 2.0, "")]);
        assert_eq!(o.perfdata.skipped, 1);
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(s in "\\PC*") {
            let o = parse_plugin_output(&s);
            prop_assert!(o.perfdata.items.len() <= MAX_ITEMS);
        }

        #[test]
        fn never_panics_on_perfdata_shaped_text(s in "[ a-z'=;:@~%.0-9eEU|\n-]{0,200}") {
            let o = parse_plugin_output(&s);
            for i in &o.perfdata.items {
                prop_assert!(!i.label.is_empty());
                prop_assert!(i.value.is_none_or(f64::is_finite));
            }
        }

        #[test]
        fn well_formed_items_round_trip(
            label in "[a-z/_][a-z0-9/_ ]{0,20}",
            v in -1e9f64..1e9,
            u in prop::sample::select(vec!["", "s", "ms", "us", "%", "B", "KB", "MB", "GB", "TB", "c"]),
        ) {
            let text = format!("'{}'={v}{u};1;2;0;100", label.replace('\'', "''"));
            let o = parse_perfdata(&text);
            prop_assert_eq!(o.skipped, 0);
            prop_assert_eq!(&o.items[0].label, &label);
            prop_assert_eq!(o.items[0].value, Some(v));
            prop_assert_eq!(&o.items[0].uom, u);
        }
    }
}
