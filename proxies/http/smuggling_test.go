package httpproxy

import "testing"

// smugglingCorpus are requests that a lenient parser in front of a strict
// one (or the reverse) would frame differently. Every one must be refused,
// the connection closed, and nothing at all reach the upstream.
var smugglingCorpus = []refusalCase{
	{name: "CL.TE", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", status: 400, reason: ReasonCLAndTE},
	{name: "TE.CL", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", status: 400, reason: ReasonCLAndTE},
	{name: "CL with obfuscated TE", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: xchunked\r\n\r\n5c\r\n", status: 400, reason: ReasonCLAndTE},
	{name: "duplicate Content-Length, different", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}", status: 400, reason: ReasonBadContentLength},
	{name: "duplicate Content-Length, equal", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", status: 400, reason: ReasonBadContentLength},
	{name: "Content-Length list", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2, 2\r\n\r\n{}", status: 400, reason: ReasonBadContentLength},
	{name: "Content-Length with a sign", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: +2\r\n\r\n{}", status: 400, reason: ReasonBadContentLength},
	{name: "Content-Length in hex", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 0x2\r\n\r\n{}", status: 400, reason: ReasonBadContentLength},
	{name: "Content-Length with trailing space", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2 \r\n\r\n{}", status: 400, reason: ReasonBadContentLength},
	{name: "TE with a trailing space", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked \r\n\r\n0\r\n\r\n", status: 501, reason: ReasonTransferEncoding},
	{name: "TE xchunked", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", status: 501, reason: ReasonTransferEncoding},
	{name: "TE chunked, identity", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", status: 501, reason: ReasonTransferEncoding},
	{name: "TE identity, chunked", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", status: 501, reason: ReasonTransferEncoding},
	{name: "TE after a tab", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n", status: 501, reason: ReasonTransferEncoding},
	{name: "TE with a vertical tab", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: \vchunked\r\n\r\n0\r\n\r\n", status: 400, reason: ReasonBadHeader},
	{name: "TE quoted", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n", status: 501, reason: ReasonTransferEncoding},
	{name: "TE twice", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", status: 400, reason: ReasonBadTransferEncoding},
	{name: "TE in HTTP/1.0", raw: "POST /v1/results HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", status: 400, reason: ReasonBadTransferEncoding},
	{name: "whitespace before the colon", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", status: 400, reason: ReasonBadHeader},
	{name: "obs-fold TE", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", status: 400, reason: ReasonBadHeader},
	{name: "obs-fold first line", raw: "GET /v1/results HTTP/1.1\r\n Host: {host}\r\n\r\n", status: 400, reason: ReasonBadHeader},
	{name: "underscore lookalike", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer_Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", status: 400, reason: ReasonBadHeader},
	{name: "Connection names Content-Length", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\n{}", status: 400, reason: ReasonBadHeader},
	{name: "bare LF line ends", raw: "GET /v1/results HTTP/1.1\nHost: {host}\n\n", status: 400, reason: ReasonBareLF},
	{name: "bare LF in a field", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nX-A: b\nTransfer-Encoding: chunked\r\n\r\n", status: 400, reason: ReasonBareLF},
	{name: "lone CR in a value", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nX-A: b\rTransfer-Encoding: chunked\r\n\r\n", status: 400, reason: ReasonBareLF},
	{name: "NUL in a value", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nX-A: b\x00c\r\n\r\n", status: 400, reason: ReasonBadHeader},
	{name: "invalid field name byte", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nX(A): b\r\n\r\n", status: 400, reason: ReasonBadHeader},
	{name: "field line without a colon", raw: "GET /v1/results HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding chunked\r\n\r\n", status: 400, reason: ReasonBadHeader},
	{name: "chunk size not hex", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", status: 400, reason: ReasonBadChunk},
	{name: "chunk size overflow", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000002\r\n{}\r\n0\r\n\r\n", status: 400, reason: ReasonBadChunk},
	{name: "chunk size with a sign", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n", status: 400, reason: ReasonBadChunk},
	{name: "chunk size with whitespace", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\n{}\r\n0\r\n\r\n", status: 400, reason: ReasonBadChunk},
	{name: "chunk extension", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2;a=b\r\n{}\r\n0\r\n\r\n", status: 400, reason: ReasonBadChunk},
	{name: "chunk longer than its size", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}x\r\n0\r\n\r\n", status: 400, reason: ReasonBadChunk},
	{name: "chunk ended by a bare LF", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n", status: 400, reason: ReasonBadChunk},
	{name: "trailer section", raw: "POST /v1/results HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Exfil: 123-45-6789\r\n\r\n", status: 400, reason: ReasonTrailer},
	{name: "HTTP/0.9", raw: "GET /v1/results\r\n", status: 505, reason: ReasonHTTPVersion},
	{name: "HTTP/2 preface", raw: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", status: 505, reason: ReasonHTTPVersion},
	{name: "HTTP/1.2", raw: "GET /v1/results HTTP/1.2\r\nHost: {host}\r\n\r\n", status: 505, reason: ReasonHTTPVersion},
	{name: "lowercase version", raw: "GET /v1/results http/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadRequestLine},
	{name: "two spaces in the request line", raw: "GET  /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadRequestLine},
	{name: "tab in the request line", raw: "GET\t/v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadRequestLine},
	{name: "empty line before the request", raw: "\r\nGET /v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadRequestLine},
	{name: "TLS ClientHello", raw: "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", status: 400, reason: ReasonBadRequestLine},
	{name: "non-ASCII in the target", raw: "GET /v1/results/\xc3\xa9 HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 400, reason: ReasonBadTarget},
	{name: "absolute-form authority differs from Host", raw: "GET http://127.0.0.1:{port}/v1/results HTTP/1.1\r\nHost: {host}\r\n\r\n", status: 421, reason: ReasonHostMismatch},
}

func TestSmugglingCorpus(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		for _, tc := range smugglingCorpus {
			t.Run(tc.name, func(t *testing.T) {
				if c, br := expectRefused(t, tc, mode); !closedByPeer(c, br) && reasons[tc.reason].status != 421 {
					t.Fatal("connection left open after a request whose framing cannot be trusted")
				}
			})
		}
	})
}
