//! Nagios plugin output: any stdout splits into a message and perfdata without a panic,
//! and what comes out keeps the parser's promises (bounded, unique labels, finite
//! normalised values for finite inputs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::checks::perfdata::{MAX_ITEMS, MAX_LABEL_CHARS, parse_plugin_output};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let out = parse_plugin_output(&text);
    let items = &out.perfdata.items;
    assert!(items.len() <= MAX_ITEMS, "{} items", items.len());
    for (i, item) in items.iter().enumerate() {
        assert!(!item.label.is_empty(), "empty label from {text:?}");
        assert!(item.label.chars().count() <= MAX_LABEL_CHARS);
        assert!(
            items[..i].iter().all(|o| o.label != item.label),
            "label {:?} twice",
            item.label
        );
        if let Some(v) = item.value {
            assert!(!v.is_nan(), "NaN value from {text:?}");
        }
    }
    assert!(!out.message.contains('\n'), "message spans lines: {:?}", out.message);
});
