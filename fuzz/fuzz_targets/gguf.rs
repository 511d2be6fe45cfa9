//! The GGUF reader (alki_shared::gguf) on arbitrary bytes: metadata only, and with every array kept; then
//! the summary a fleet computes from it. Any outcome but a panic, an abort or a huge allocation is fine; a
//! file that reads must have every sized tensor inside its data section.

#![no_main]

use std::io::Cursor;

use alki_shared::gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for keep_all in [false, true] {
        let mut cursor = Cursor::new(data);
        let read = if keep_all { gguf::read_with_arrays(&mut cursor, |_| true) } else { gguf::read(&mut cursor) };
        match read {
            Ok(file) => {
                assert_eq!(file.file_size, data.len() as u64);
                let available = file.tensor_data_size();
                for t in &file.tensors {
                    let _ = t.type_name();
                    if let Some(len) = t.byte_size() {
                        let end = t.offset.checked_add(len);
                        assert!(end.is_some_and(|end| end <= available), "tensor {} past the data section", t.name);
                    }
                }
                let info = file.info();
                for context in [0, 1, 4096, u64::MAX] {
                    let _ = info.kv_cache_bytes(context);
                }
                let _ = serde_json::to_string(&info);
                for entry in &file.metadata {
                    let _ = (entry.value.as_u64(), entry.value.as_i64(), entry.value.as_f64(), entry.value.as_str());
                    if let Some(array) = entry.value.as_array() {
                        let _ = array.values.as_ref().map(|v| v.to_u64s());
                    }
                }
                let _ = file.get_u64("general.file_type").map(gguf::file_type_name);
            }
            Err(error) => {
                let _ = error.to_string();
                let _ = error.root();
            }
        }
    }
});
