//! The control socket's protocol, pure: one request line, one answer line, both JSON. A
//! local client (`tunnel status`, `tunnel reload`) connects to the running process's Unix
//! socket, writes a request, reads the answer, and the process closes the connection.
//!
//! ```text
//! request = {"v":1,"cmd":"status"} | {"v":1,"cmd":"reload"}        one line, ≤ 4 KiB
//! answer  = {"v":1,"ok":true,"result":{...}} | {"v":1,"ok":false,"error":"why"}   one line
//! ```
//! `v` is the protocol version; a request of another version, an unknown command or garbage
//! gets `ok: false` with the reason. `result` of `status` is documented in `docs/status.md`.

use serde::{Deserialize, Serialize};

/// The version this build speaks.
pub const VERSION: u32 = 1;
/// Longest request line, newline included.
pub const MAX_REQUEST: usize = 4 * 1024;

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// The process's state now.
    Status,
    /// Read the rules again (as SIGHUP does).
    Reload,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    v: u32,
    cmd: Command,
}

/// The request line for `cmd`, newline included.
pub fn encode_request(cmd: Command) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Request { v: VERSION, cmd }).expect("serializes");
    line.push(b'\n');
    line
}

/// The command of a request line (without its newline), or why it is not one.
pub fn decode_request(line: &[u8]) -> Result<Command, String> {
    if line.len() >= MAX_REQUEST {
        return Err(format!("request over {MAX_REQUEST} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON request: {e}"))?;
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "control protocol version {v}, this process speaks {VERSION}: use a `tunnel` of the same version"
            ))
        }
        None => return Err("no protocol version (\"v\")".into()),
    }
    serde_json::from_value::<Request>(value)
        .map(|r| r.cmd)
        .map_err(|e| format!("bad request: {e}"))
}

/// An answer line, newline included.
pub fn encode_answer(result: Result<serde_json::Value, String>) -> Vec<u8> {
    let value = match result {
        Ok(result) => serde_json::json!({ "v": VERSION, "ok": true, "result": result }),
        Err(error) => serde_json::json!({ "v": VERSION, "ok": false, "error": error }),
    };
    let mut line = serde_json::to_vec(&value).expect("serializes");
    line.push(b'\n');
    line
}

/// The result of an answer line, or the process's error, or why the line is not an answer.
pub fn decode_answer(line: &[u8]) -> Result<serde_json::Value, String> {
    let mut value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON answer: {e}"))?;
    if value.get("v").and_then(|v| v.as_u64()) != Some(u64::from(VERSION)) {
        return Err(format!(
            "the process answered in another control protocol version (this client speaks {VERSION})"
        ));
    }
    match value.get("ok").and_then(|v| v.as_bool()) {
        Some(true) => Ok(value
            .get_mut("result")
            .map(serde_json::Value::take)
            .unwrap_or_default()),
        _ => Err(value
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("the process refused without a reason")
            .to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_and_answers_round_trip() {
        for cmd in [Command::Status, Command::Reload] {
            let line = encode_request(cmd);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(decode_request(&line[..line.len() - 1]), Ok(cmd));
        }
        let ok = encode_answer(Ok(serde_json::json!({"x": 1})));
        assert_eq!(
            decode_answer(&ok[..ok.len() - 1]),
            Ok(serde_json::json!({"x": 1}))
        );
        let err = encode_answer(Err("no".into()));
        assert_eq!(decode_answer(&err), Err("no".into()));
    }

    #[test]
    fn bad_requests_say_why() {
        let cases: [(&[u8], &str); 5] = [
            (b"garbage", "not a JSON request"),
            (br#"{"cmd":"status"}"#, "no protocol version"),
            (br#"{"v":2,"cmd":"status"}"#, "version 2"),
            (br#"{"v":1,"cmd":"format_disk"}"#, "bad request"),
            (br#"{"v":1,"cmd":"status","x":1}"#, "bad request"),
        ];
        for (line, why) in cases {
            let err = decode_request(line).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        assert!(decode_request(&[b' '; MAX_REQUEST]).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_answer(&bytes);
        }
    }
}
