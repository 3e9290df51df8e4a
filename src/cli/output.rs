//! Printing results: aligned tables for people, JSON for scripts.

use serde_json::Value;

use crate::stdout::say;

/// One table cell: numbers stay numbers in JSON.
pub enum Cell {
    /// Text.
    Text(String),
    /// A number.
    Number(u64),
}

impl Cell {
    fn shown(&self) -> String {
        match self {
            Cell::Text(text) => text.clone(),
            Cell::Number(number) => number.to_string(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Text(text) => Value::from(text.as_str()),
            Cell::Number(number) => Value::from(*number),
        }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell::Text(text)
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell::Text(text.to_owned())
    }
}

impl From<u64> for Cell {
    fn from(number: u64) -> Cell {
        Cell::Number(number)
    }
}

impl From<u32> for Cell {
    fn from(number: u32) -> Cell {
        Cell::Number(u64::from(number))
    }
}

/// Prints `rows` under `headers` as an aligned table, or as a JSON array of objects.
pub fn print_table(headers: &[&str], rows: &[Vec<Cell>], json: bool) {
    if json {
        let objects: Vec<Value> = rows
            .iter()
            .map(|row| {
                Value::Object(
                    headers
                        .iter()
                        .zip(row)
                        .map(|(header, cell)| ((*header).to_owned(), cell.json()))
                        .collect(),
                )
            })
            .collect();
        say(format_args!("{}", Value::Array(objects)));
        return;
    }
    let shown: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(Cell::shown).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in &shown {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        say(format_args!("{}", padded.join("  ").trim_end()));
    };
    line(headers.to_vec());
    for row in &shown {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Bytes as text when they are printable UTF-8, otherwise as `0x` hex.
pub fn show_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => text.to_owned(),
        _ => {
            let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("0x{hex}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_text_as_is_and_binary_as_hex() {
        assert_eq!(show_bytes(b"alice"), "alice");
        assert_eq!(show_bytes(&[0, 255]), "0x00ff");
        assert_eq!(show_bytes(b"a\nb"), "0x610a62");
    }

    #[test]
    fn json_keeps_numbers_and_names_apart() {
        assert_eq!(Cell::from("123").json(), Value::from("123"));
        assert_eq!(Cell::from(123u64).json(), Value::from(123u64));
    }
}
