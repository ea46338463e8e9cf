//! nbformat v4 notebooks backed by `serde_json` values.
//!
//! The model types only the fields the executor touches (cell type, id, source, outputs,
//! execution count, metadata) and keeps everything else in `extra` maps, so a notebook read and
//! written by the worker loses nothing (unknown metadata, attachments, future fields). In memory,
//! multi-line strings are joined (like nbformat's `rejoin_lines`); on write they are split into
//! line lists again (nbformat's `split_lines`), so the file matches Python's `nbformat.write`.

use serde_json::{Map, Value};

use super::json::{splitlines_keepends, to_python_json};

/// Errors reading a notebook. Writing cannot fail.
#[derive(Debug, thiserror::Error)]
pub enum NotebookError {
    /// The text is not JSON.
    #[error("notebook is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON is not a v4 notebook (wrong shape or an older/newer major format).
    #[error("not an nbformat v4 notebook: {0}")]
    Format(String),
    /// Reading or writing the file failed.
    #[error("notebook I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A notebook cell. `cell_type` stays a string so unknown cell types pass through untouched.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// `"code"`, `"markdown"`, `"raw"` (others are kept but never executed).
    pub cell_type: String,
    /// Cell id (nbformat ≥ 4.5). Kept as read; generated only when 4.5+ requires one.
    pub id: Option<String>,
    /// Source, joined into one string.
    pub source: String,
    /// Cell metadata (tags live in `metadata.tags`, timings in `metadata.execution`).
    pub metadata: Map<String, Value>,
    /// Outputs (code cells only), multi-line strings joined.
    pub outputs: Vec<Value>,
    /// `execution_count` (code cells only).
    pub execution_count: Option<i64>,
    /// Every other key of the cell object (e.g. `attachments`), verbatim.
    pub extra: Map<String, Value>,
}

impl Cell {
    /// A code cell with the given source and no outputs.
    pub fn code(source: impl Into<String>) -> Self {
        Cell {
            cell_type: "code".into(),
            id: Some(random_cell_id()),
            source: source.into(),
            metadata: Map::new(),
            outputs: Vec::new(),
            execution_count: None,
            extra: Map::new(),
        }
    }

    /// A markdown cell.
    pub fn markdown(source: impl Into<String>) -> Self {
        Cell {
            cell_type: "markdown".into(),
            ..Cell::code(source)
        }
    }

    /// True for code cells.
    pub fn is_code(&self) -> bool {
        self.cell_type == "code"
    }

    /// The cell's `metadata.tags` (strings only; anything malformed counts as no tags).
    pub fn tags(&self) -> Vec<&str> {
        match self.metadata.get("tags") {
            Some(Value::Array(tags)) => tags.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// True when `metadata.tags` contains `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags().contains(&tag)
    }

    fn from_value(value: Value, needs_id: bool) -> Result<Cell, NotebookError> {
        let Value::Object(mut map) = value else {
            return Err(NotebookError::Format("cell is not an object".into()));
        };
        let cell_type = match map.remove("cell_type") {
            Some(Value::String(s)) => s,
            _ => return Err(NotebookError::Format("cell without cell_type".into())),
        };
        let id = match map.remove("id") {
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                // Not a valid id: keep it verbatim rather than guess.
                map.insert("id".into(), other);
                None
            }
            None if needs_id => Some(random_cell_id()),
            None => None,
        };
        let source = join_text(map.remove("source").unwrap_or(Value::String(String::new())))
            .ok_or_else(|| NotebookError::Format("cell source is not a string".into()))?;
        let metadata = match map.remove("metadata") {
            Some(Value::Object(m)) => m,
            None => Map::new(),
            Some(_) => {
                return Err(NotebookError::Format(
                    "cell metadata is not an object".into(),
                ))
            }
        };
        let mut outputs = Vec::new();
        let mut execution_count = None;
        if cell_type == "code" {
            match map.remove("outputs") {
                Some(Value::Array(outs)) => outputs = outs.into_iter().map(rejoin_output).collect(),
                None => {}
                Some(_) => return Err(NotebookError::Format("cell outputs is not a list".into())),
            }
            execution_count = map.remove("execution_count").and_then(|v| v.as_i64());
        }
        if let Some(Value::Object(att)) = map.get_mut("attachments") {
            for bundle in att.values_mut() {
                if let Value::Object(b) = bundle {
                    rejoin_mimebundle(b);
                }
            }
        }
        Ok(Cell {
            cell_type,
            id,
            source,
            metadata,
            outputs,
            execution_count,
            extra: map,
        })
    }

    /// The cell as JSON; `split` applies nbformat's `split_lines` (used for files).
    fn to_value(&self, split: bool) -> Value {
        let mut map = self.extra.clone();
        map.insert("cell_type".into(), Value::String(self.cell_type.clone()));
        if let Some(id) = &self.id {
            map.insert("id".into(), Value::String(id.clone()));
        }
        map.insert("source".into(), text_value(&self.source, split));
        let mut metadata = self.metadata.clone();
        if split {
            metadata.remove("trusted");
        }
        map.insert("metadata".into(), Value::Object(metadata));
        if self.is_code() {
            let outputs = self
                .outputs
                .iter()
                .map(|o| if split { split_output(o) } else { o.clone() })
                .collect();
            map.insert("outputs".into(), Value::Array(outputs));
            map.insert(
                "execution_count".into(),
                self.execution_count.map_or(Value::Null, Value::from),
            );
        }
        if split {
            if let Some(Value::Object(att)) = map.get_mut("attachments") {
                for bundle in att.values_mut() {
                    if let Value::Object(b) = bundle {
                        split_mimebundle(b);
                    }
                }
            }
        }
        Value::Object(map)
    }
}

/// An nbformat v4 notebook.
#[derive(Debug, Clone, PartialEq)]
pub struct Notebook {
    /// Cells in order.
    pub cells: Vec<Cell>,
    /// Notebook metadata (`kernelspec`, `language_info`, anything else verbatim).
    pub metadata: Map<String, Value>,
    /// Always 4.
    pub nbformat: u64,
    /// Minor version as read (ids are required from 5 on).
    pub nbformat_minor: u64,
    /// Unknown top-level keys, verbatim.
    pub extra: Map<String, Value>,
}

impl Default for Notebook {
    fn default() -> Self {
        Notebook {
            cells: Vec::new(),
            metadata: Map::new(),
            nbformat: 4,
            nbformat_minor: 5,
            extra: Map::new(),
        }
    }
}

impl Notebook {
    /// Parses notebook JSON text (sources and outputs may be strings or lists of strings).
    pub fn parse(text: &str) -> Result<Notebook, NotebookError> {
        Notebook::from_value(serde_json::from_str(text)?)
    }

    /// Parses notebook JSON bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Notebook, NotebookError> {
        Notebook::from_value(serde_json::from_slice(bytes)?)
    }

    /// Reads a `.ipynb` file.
    pub fn read(path: impl AsRef<std::path::Path>) -> Result<Notebook, NotebookError> {
        Notebook::from_slice(&std::fs::read(path)?)
    }

    /// Builds the model from a JSON value.
    pub fn from_value(value: Value) -> Result<Notebook, NotebookError> {
        let Value::Object(mut map) = value else {
            return Err(NotebookError::Format("top level is not an object".into()));
        };
        let mut nbformat = map
            .get("nbformat")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| NotebookError::Format("missing nbformat".into()))?;
        if nbformat == 3 {
            // nbformat.read(..., as_version=4) upgrades v3 on read (omega|ml's
            // worker runs such notebooks), so the rest of this reads the v4 result.
            upgrade_v3(&mut map)?;
            nbformat = 4;
        }
        map.remove("nbformat");
        if nbformat != 4 {
            return Err(NotebookError::Format(format!(
                "nbformat {nbformat} (only v4 is supported; convert with `jupyter nbconvert --to notebook`)"
            )));
        }
        let nbformat_minor = map
            .remove("nbformat_minor")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let mut metadata = match map.remove("metadata") {
            Some(Value::Object(m)) => m,
            None => Map::new(),
            Some(_) => return Err(NotebookError::Format("metadata is not an object".into())),
        };
        // nbformat strips these on read and write.
        for key in ["orig_nbformat", "orig_nbformat_minor", "signature"] {
            metadata.remove(key);
        }
        let cells = match map.remove("cells") {
            Some(Value::Array(cells)) => cells
                .into_iter()
                .map(|c| Cell::from_value(c, nbformat_minor >= 5))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
            Some(_) => return Err(NotebookError::Format("cells is not a list".into())),
        };
        Ok(Notebook {
            cells,
            metadata,
            nbformat,
            nbformat_minor,
            extra: map,
        })
    }

    /// The notebook as a JSON value with joined strings (the in-memory nbformat form).
    pub fn to_value(&self) -> Value {
        self.value(false)
    }

    fn value(&self, split: bool) -> Value {
        let mut map = self.extra.clone();
        map.insert(
            "cells".into(),
            Value::Array(self.cells.iter().map(|c| c.to_value(split)).collect()),
        );
        let mut metadata = self.metadata.clone();
        for key in ["orig_nbformat", "orig_nbformat_minor", "signature"] {
            metadata.remove(key);
        }
        map.insert("metadata".into(), Value::Object(metadata));
        map.insert("nbformat".into(), Value::from(self.nbformat));
        map.insert("nbformat_minor".into(), Value::from(self.nbformat_minor));
        Value::Object(map)
    }

    /// The `.ipynb` text exactly as Python's `nbformat.write` would produce it (split lines,
    /// `indent=1`, sorted keys, non-ASCII verbatim, trailing newline).
    pub fn to_ipynb_string(&self) -> String {
        let mut s = to_python_json(&self.value(true));
        s.push('\n');
        s
    }

    /// Writes the `.ipynb` file (via a temporary file and rename, so readers never see half a
    /// notebook).
    pub fn write(&self, path: impl AsRef<std::path::Path>) -> Result<(), NotebookError> {
        let path = path.as_ref();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "notebook".into());
        let tmp = dir.join(format!(
            ".{file_name}.{}.tmp",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&tmp, self.to_ipynb_string())?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        Ok(())
    }

    /// `metadata.kernelspec.name`, if the notebook names a kernel.
    pub fn kernel_name(&self) -> Option<&str> {
        self.metadata
            .get("kernelspec")
            .and_then(|k| k.get("name"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Clears outputs and execution counts of code cells, like nbconvert's
    /// `ClearOutputPreprocessor` (which omega|ml runs unless `keep_output`): it also drops the
    /// cell metadata keys `collapsed`, `scrolled` and `execution`.
    pub fn clear_outputs(&mut self) {
        for cell in &mut self.cells {
            if cell.is_code() {
                cell.outputs.clear();
                cell.execution_count = None;
                for key in ["collapsed", "scrolled", "execution"] {
                    cell.metadata.remove(key);
                }
            }
        }
    }
}

/// nbformat's v3 → v4 upgrade (`nbformat.v3.rwbase.rejoin_lines`, then
/// `nbformat.v4.convert.upgrade`), in place on the top-level object: the cells
/// of every worksheet in order, `input` → `source`, `prompt_number` →
/// `execution_count`, `language` dropped and `collapsed` moved into the
/// metadata, heading cells → markdown `#` lines and html cells → markdown,
/// outputs `pyout` → `execute_result` and `pyerr` → `error` with their v3 keys
/// (`text`, `png`, `html`, ...) moved under `data` as MIME types, `stream` →
/// `name`. Every cell gets a fresh id and the notebook becomes 4.5, as nbformat
/// makes it. A notebook nbformat cannot convert (no worksheet `cells`, a cell
/// without `cell_type`, a code cell without `outputs`, undecodable
/// `application/json` output) is refused with the reason.
fn upgrade_v3(nb: &mut Map<String, Value>) -> Result<(), NotebookError> {
    let bad = |why: String| NotebookError::Format(format!("nbformat 3 notebook: {why}"));
    for key in ["orig_nbformat", "orig_nbformat_minor"] {
        nb.remove(key);
    }
    if !nb.contains_key("metadata") {
        return Err(bad(missing_key("metadata")));
    }
    let worksheets = match nb.remove("worksheets") {
        None => Vec::new(),
        Some(Value::Array(ws)) => ws,
        Some(_) => return Err(bad("worksheets is not a list".into())),
    };
    let mut cells = Vec::new();
    for ws in worksheets {
        let Some(Value::Array(ws_cells)) = ws.get("cells").cloned() else {
            return Err(bad(missing_key("cells")));
        };
        for cell in ws_cells {
            let Value::Object(cell) = cell else {
                return Err(bad("a cell is not an object".into()));
            };
            cells.push(Value::Object(upgrade_v3_cell(cell).map_err(bad)?));
        }
    }
    nb.insert("cells".into(), Value::Array(cells));
    if let Some(Value::Object(meta)) = nb.get_mut("metadata") {
        for key in ["name", "signature"] {
            meta.remove(key);
        }
    }
    nb.insert("nbformat".into(), Value::from(4));
    nb.insert("nbformat_minor".into(), Value::from(5));
    Ok(())
}

/// nbformat's message for a key its conversion needs (`converter.convert`
/// turns the `AttributeError` into this `ValidationError`).
fn missing_key(key: &str) -> String {
    format!("The notebook is invalid and is missing an expected key: {key}")
}

/// v3 `_join_lines`: a list written by `splitlines(True)` is concatenated, one
/// written by `splitlines()` joined with newlines. Non-lists stay as they are.
fn v3_join(value: &mut Value) {
    if let Value::Array(lines) = value {
        let Some(parts) = lines.iter().map(Value::as_str).collect::<Option<Vec<_>>>() else {
            return;
        };
        let sep = match parts.first() {
            Some(first) if first.ends_with('\n') || first.ends_with('\r') => "",
            _ => "\n",
        };
        *value = Value::String(parts.join(sep));
    }
}

/// `nbformat.v4.convert.upgrade_cell` (after v3 `rejoin_lines`).
fn upgrade_v3_cell(mut cell: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let cell_type = match cell.get("cell_type") {
        Some(Value::String(t)) => t.clone(),
        _ => return Err(missing_key("cell_type")),
    };
    if !cell.get("metadata").is_some_and(Value::is_object) {
        if cell.contains_key("metadata") {
            return Err("cell metadata is not an object".into());
        }
        cell.insert("metadata".into(), Value::Object(Map::new()));
    }
    cell.insert("id".into(), Value::String(random_cell_id()));
    match cell_type.as_str() {
        "code" => {
            if let Some(input) = cell.get_mut("input") {
                v3_join(input);
            }
            cell.remove("language");
            if let Some(collapsed) = cell.remove("collapsed") {
                if let Some(Value::Object(meta)) = cell.get_mut("metadata") {
                    meta.insert("collapsed".into(), collapsed);
                }
            }
            let source = cell
                .remove("input")
                .unwrap_or_else(|| Value::String(String::new()));
            cell.insert("source".into(), source);
            let count = cell.remove("prompt_number").unwrap_or(Value::Null);
            cell.insert("execution_count".into(), count);
            let outputs = match cell.remove("outputs") {
                Some(Value::Array(outs)) => outs,
                Some(_) => return Err("cell outputs is not a list".into()),
                None => return Err(missing_key("outputs")),
            };
            let outputs = outputs
                .into_iter()
                .map(upgrade_v3_output)
                .collect::<Result<Vec<_>, _>>()?;
            cell.insert("outputs".into(), Value::Array(outputs));
        }
        other => {
            for key in ["source", "rendered"] {
                if let Some(v) = cell.get_mut(key) {
                    v3_join(v);
                }
            }
            if other == "heading" {
                let level = match cell.remove("level") {
                    None => 1,
                    Some(Value::Number(n)) if n.is_i64() => n.as_i64().unwrap_or(1),
                    Some(v) => return Err(format!("heading level {v} is not an integer")),
                };
                let text = match cell.get("source") {
                    None => String::new(),
                    Some(Value::String(s)) => splitlines_keepends(s)
                        .iter()
                        .map(|l| strip_line_end(l))
                        .collect::<Vec<_>>()
                        .join(" "),
                    Some(_) => return Err("heading source is not a string".into()),
                };
                let hashes = "#".repeat(usize::try_from(level).unwrap_or(0));
                cell.insert("cell_type".into(), Value::from("markdown"));
                cell.insert("source".into(), Value::String(format!("{hashes} {text}")));
            } else if other == "html" {
                cell.insert("cell_type".into(), Value::from("markdown"));
            }
        }
    }
    Ok(cell)
}

/// A line from [`splitlines_keepends`] without its line break (`str.splitlines()`).
fn strip_line_end(line: &str) -> &str {
    line.strip_suffix("\r\n").unwrap_or_else(|| {
        line.strip_suffix(|c: char| {
            matches!(
                c,
                '\n' | '\r'
                    | '\u{0b}'
                    | '\u{0c}'
                    | '\u{1c}'
                    | '\u{1d}'
                    | '\u{1e}'
                    | '\u{85}'
                    | '\u{2028}'
                    | '\u{2029}'
            )
        })
        .unwrap_or(line)
    })
}

/// nbformat v4 `_mime_map`, in its order (`to_mime_key` renames in this order).
const V3_MIME_MAP: [(&str, &str); 8] = [
    ("text", "text/plain"),
    ("html", "text/html"),
    ("svg", "image/svg+xml"),
    ("png", "image/png"),
    ("jpeg", "image/jpeg"),
    ("latex", "text/latex"),
    ("json", "application/json"),
    ("javascript", "application/javascript"),
];

fn to_mime_key(d: &mut Map<String, Value>) {
    for (alias, mime) in V3_MIME_MAP {
        if let Some(v) = d.remove(alias) {
            d.insert(mime.into(), v);
        }
    }
}

/// `nbformat.v4.convert.upgrade_output` (after v3 `rejoin_lines`).
fn upgrade_v3_output(output: Value) -> Result<Value, String> {
    let Value::Object(mut out) = output else {
        return Ok(output);
    };
    for key in ["text", "html", "svg", "latex", "javascript", "json"] {
        if let Some(v) = out.get_mut(key) {
            v3_join(v);
        }
    }
    let output_type = match out.get("output_type") {
        Some(Value::String(t)) => t.clone(),
        _ => return Err("an output has no output_type".into()),
    };
    match output_type.as_str() {
        "pyout" | "display_data" => {
            if !out.contains_key("metadata") {
                out.insert("metadata".into(), Value::Object(Map::new()));
            }
            if output_type == "pyout" {
                out.insert("output_type".into(), Value::from("execute_result"));
                let count = out.remove("prompt_number").unwrap_or(Value::Null);
                out.insert("execution_count".into(), count);
            }
            let keys: Vec<String> = out
                .keys()
                .filter(|k| !matches!(k.as_str(), "output_type" | "execution_count" | "metadata"))
                .cloned()
                .collect();
            let mut data = Map::new();
            for k in keys {
                if let Some(v) = out.remove(&k) {
                    data.insert(k, v);
                }
            }
            to_mime_key(&mut data);
            if let Some(Value::Object(meta)) = out.get_mut("metadata") {
                to_mime_key(meta);
            }
            if let Some(j) = data.get_mut("application/json") {
                let Value::String(text) = j else {
                    return Err("application/json output is not a string".into());
                };
                *j = serde_json::from_str(text)
                    .map_err(|e| format!("application/json output is not JSON: {e}"))?;
            }
            out.insert("data".into(), Value::Object(data));
        }
        "pyerr" => {
            out.insert("output_type".into(), Value::from("error"));
        }
        "stream" => {
            let name = out
                .remove("stream")
                .unwrap_or_else(|| Value::from("stdout"));
            out.insert("name".into(), name);
        }
        _ => {}
    }
    Ok(Value::Object(out))
}

/// nbformat's `random_cell_id`: 8 lowercase hex characters of a uuid4.
pub fn random_cell_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// `"".join(list)` for list-of-str values; `None` when the value is neither a string nor a list
/// of strings.
fn join_text(value: Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                s.push_str(p.as_str()?);
            }
            Some(s)
        }
        _ => None,
    }
}

fn is_json_mime(mime: &str) -> bool {
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

fn rejoin_mimebundle(data: &mut Map<String, Value>) {
    for (mime, value) in data.iter_mut() {
        if is_json_mime(mime) {
            continue;
        }
        if let Value::Array(parts) = value {
            if parts.iter().all(Value::is_string) {
                let joined: String = parts.iter().filter_map(Value::as_str).collect();
                *value = Value::String(joined);
            }
        }
    }
}

fn rejoin_output(mut output: Value) -> Value {
    if let Value::Object(map) = &mut output {
        let output_type = map
            .get("output_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if output_type == "execute_result" || output_type == "display_data" {
            if let Some(Value::Object(data)) = map.get_mut("data") {
                rejoin_mimebundle(data);
            }
        } else if !output_type.is_empty() {
            if let Some(text) = map.get_mut("text") {
                if text.is_array() {
                    if let Some(joined) = join_text(text.take()) {
                        *text = Value::String(joined);
                    }
                }
            }
        }
    }
    output
}

fn text_value(s: &str, split: bool) -> Value {
    if split {
        Value::Array(
            splitlines_keepends(s)
                .into_iter()
                .map(Value::String)
                .collect(),
        )
    } else {
        Value::String(s.to_string())
    }
}

fn split_mimebundle(data: &mut Map<String, Value>) {
    for (mime, value) in data.iter_mut() {
        if mime.starts_with("text/") || mime == "application/javascript" || mime == "image/svg+xml"
        {
            if let Value::String(s) = value {
                *value = text_value(s, true);
            }
        }
    }
}

fn split_output(output: &Value) -> Value {
    let mut output = output.clone();
    if let Value::Object(map) = &mut output {
        match map.get("output_type").and_then(Value::as_str) {
            Some("execute_result") | Some("display_data") => {
                if let Some(Value::Object(data)) = map.get_mut("data") {
                    split_mimebundle(data);
                }
            }
            Some("stream") => {
                if let Some(Value::String(s)) = map.get("text") {
                    let v = text_value(s, true);
                    map.insert("text".into(), v);
                }
            }
            _ => {}
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_keeps_unknown_fields_and_ids() {
        let text = r##"{"cells":[{"cell_type":"code","id":"abc","metadata":{"x":1,"trusted":true},
            "source":["a\n","b"],"outputs":[{"output_type":"stream","name":"stdout","text":["1\n","2"]}],
            "execution_count":3,"weird":[1]},{"cell_type":"markdown","metadata":{},"source":"# hi",
            "attachments":{"a.png":{"image/png":"xx","text/plain":["l1\n","l2"]}}}],
            "metadata":{"kernelspec":{"name":"python3"},"orig_nbformat":3},"nbformat":4,"nbformat_minor":4,"top":true}"##;
        let nb = Notebook::parse(text).expect("parse");
        assert_eq!(nb.cells[0].source, "a\nb");
        assert_eq!(nb.cells[0].id.as_deref(), Some("abc"));
        assert_eq!(nb.cells[0].outputs[0]["text"], "1\n2");
        assert_eq!(nb.cells[1].id, None, "4.4 notebooks get no generated ids");
        assert_eq!(nb.kernel_name(), Some("python3"));
        let out = nb.to_ipynb_string();
        assert!(out.ends_with("}\n"));
        let back: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(back["top"], true);
        assert_eq!(back["cells"][0]["weird"][0], 1);
        assert_eq!(back["cells"][0]["source"][0], "a\n");
        assert!(back["cells"][0]["metadata"].get("trusted").is_none());
        assert!(back["metadata"].get("orig_nbformat").is_none());
        assert_eq!(
            back["cells"][1]["attachments"]["a.png"]["text/plain"][1],
            "l2"
        );
        assert!(back["cells"][1].get("outputs").is_none());
        let again = Notebook::parse(&out).expect("reparse");
        assert_eq!(again.to_ipynb_string(), out);
    }

    #[test]
    fn generates_ids_for_45() {
        let nb = Notebook::parse(
            r#"{"cells":[{"cell_type":"raw","metadata":{},"source":""}],"metadata":{},"nbformat":4,"nbformat_minor":5}"#,
        )
        .expect("parse");
        assert_eq!(nb.cells[0].id.as_ref().map(String::len), Some(8));
    }

    #[test]
    fn rejects_v3_and_garbage() {
        assert!(Notebook::parse(r#"{"nbformat":3,"worksheets":[]}"#).is_err());
        assert!(Notebook::parse("[]").is_err());
        assert!(Notebook::parse(r#"{"nbformat":4,"cells":[{"source":1}]}"#).is_err());
    }
}
