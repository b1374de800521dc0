//! Real third-party programs through the real binaries: nginx fetched with curl, and a
//! GStreamer RTSP server played with ffmpeg (RTSP interleaved over TCP).
//! Skipped loudly when a program is missing, except with TUNNEL_REQUIRE_TOOLS=1 (CI).

mod common;

use std::process::Command;

use common::process::*;
use common::{random_bytes, sha256};

#[test]
fn nginx_served_through_the_tunnel_to_curl() {
    if !have("nginx") || !have("curl") {
        return;
    }
    let dir = TempDir::new("nginx");
    let root = dir.path("www");
    std::fs::create_dir_all(&root).unwrap();
    let big = random_bytes(8 << 20);
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(root.join("index.html"), "<h1>camera ui</h1>\n").unwrap();
    let port = free_port();
    let conf = dir.path("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            d = dir.0.display(),
            root = root.display()
        ),
    )
    .unwrap();
    let _nginx = Proc::spawn(
        "nginx",
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir.0),
    );
    let target = format!("127.0.0.1:{port}");
    wait_connectable(&target);

    let pair = start_pair(&[("web", &target)], &[]);
    let local = &pair.locals[0];
    let out = dir.path("big.out");
    // Two URLs in one curl: the second reuses curl's keep-alive connection (one stream).
    let status = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60"])
        .arg("-o")
        .arg(dir.path("index.out"))
        .arg(format!("http://{local}/index.html"))
        .arg("-o")
        .arg(&out)
        .arg(format!("http://{local}/big.bin"))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "curl failed; tunnel logs:\n{}\n{}",
        pair.connect.stderr(),
        pair.expose.stderr()
    );
    assert_eq!(
        std::fs::read_to_string(dir.path("index.out")).unwrap(),
        "<h1>camera ui</h1>\n"
    );
    assert_eq!(
        sha256(&std::fs::read(&out).unwrap()),
        sha256(&big),
        "8 MiB file byte for byte"
    );
    // A missing page is nginx's own 404, through the tunnel.
    let code = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .arg(format!("http://{local}/missing"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&code.stdout), "404");
}

#[test]
fn an_rtsp_camera_plays_through_the_tunnel_with_ffmpeg() {
    if !have("ffmpeg") || !have("/usr/bin/python3") {
        return;
    }
    if !have_gst_rtsp_server() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rtsp_server.py");
    let server = Proc::spawn(
        "rtsp server",
        Command::new("/usr/bin/python3").arg(script).arg("0"),
    );
    let ready = server.line_matching(|l| l.starts_with("ready "));
    let port = ready.split_whitespace().nth(1).unwrap();
    let target = format!("127.0.0.1:{port}");

    let pair = start_pair(&[("cam", &target)], &[]);
    let url = format!("rtsp://{}/test", pair.locals[0]);
    let out = Command::new("timeout")
        .args([
            "60",
            "ffmpeg",
            "-nostdin",
            "-hide_banner",
            "-rtsp_transport",
            "tcp",
            "-i",
            &url,
        ])
        .args(["-frames:v", "30", "-f", "null", "-"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ffmpeg failed:\n{log}\ntunnel:\n{}",
        pair.connect.stderr()
    );
    let frames = ffmpeg_frames(&log);
    assert!(frames >= 25, "decoded {frames} frames:\n{log}");
}
