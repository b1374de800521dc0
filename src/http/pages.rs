//! The pages the connecting side answers with itself: errors (what failed and what to do)
//! and the index. Plain server-rendered HTML with no external resources.

use crate::protocol::header::Status;
use crate::tunnel::splice::Abort;

/// The reason phrase of the statuses we answer with.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// The page status and text for an open that did not give a stream: the exposing side's
/// refusal (an unknown service is 404, a busy peer 503, anything else 502), or what failed.
pub fn refusal(abort: &Abort) -> (u16, String) {
    match abort {
        Abort::Refused { status, message } => (status_of(*status), message.clone()),
        other => (502, other.to_string()),
    }
}

fn status_of(status: Status) -> u16 {
    match status {
        Status::UnknownService => 404,
        Status::Busy => 503,
        _ => 502,
    }
}

/// `page` without its body: the answer to a `HEAD` (same head, `Content-Length` included).
pub fn head_only(mut page: Vec<u8>) -> Vec<u8> {
    if let Some(end) = page.windows(4).position(|w| w == b"\r\n\r\n") {
        page.truncate(end + 4);
    }
    page
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole response: `status` with an HTML `body`, closing the connection after it when
/// `close`.
pub fn response(status: u16, body: &str, close: bool) -> Vec<u8> {
    typed(status, "text/html; charset=utf-8", body, close)
}

/// A whole response of type `kind`.
pub fn typed(status: u16, kind: &str, body: &str, close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{}\r\n",
        reason(status),
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A page around `content` (already HTML).
pub fn html(title: &str, content: &str) -> String {
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:60em}}td,th{{padding:.2em 1em;text-align:left}}\
         .on{{color:#070}}.off{{color:#a00}}</style></head>\n<body><h1>{t}</h1>\n{content}\n</body></html>\n",
        t = escape(title)
    )
}

/// An error page for `status` saying `message`; the connection closes after it.
pub fn error(status: u16, message: &str) -> Vec<u8> {
    let title = format!("{status} {}", reason(status));
    let body = html(
        &title,
        &format!("<p id=\"message\">{}</p>", escape(message)),
    );
    response(status, &body, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_pages_are_whole_responses_with_the_message_escaped() {
        let page = String::from_utf8(error(502, "peer <home> is offline")).unwrap();
        assert!(page.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{page}");
        assert!(page.contains("peer &lt;home&gt; is offline"));
        let (head, body) = page.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Connection: close"));
    }
}
