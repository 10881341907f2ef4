//! The benchmark upstream answers the fixed body over HTTP/1.1 keep-alive and h2c prior knowledge,
//! using real hyper clients over loopback.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use trellis_bench_upstream::{DEFAULT_BODY, serve};

async fn start() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, Bytes::from_static(DEFAULT_BODY)));
    addr
}

fn get(authority: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(format!("http://{authority}/anything"))
        .header("host", authority)
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn http1_keep_alive_serves_the_fixed_body_twice_on_one_connection() {
    let addr = start().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        let response = sender.send_request(get(&addr.to_string())).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], DEFAULT_BODY);
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_serves_the_fixed_body() {
    let addr = start().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(get(&addr.to_string())).await.unwrap();
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], DEFAULT_BODY);
}
