"""A Hugging Face Hub on 127.0.0.1 for tests: the real huggingface_hub client downloads from it (HF_ENDPOINT)."""
import contextlib
import hashlib
import http.server
import threading


@contextlib.contextmanager
def local_hub(files: dict[tuple[str, str], bytes], commits: dict[str, str], repo: str = "facebook/SSDD"):
    """Serve {(revision, filename): bytes} of `repo` at the revisions in `commits` ({revision: 40-hex sha});
    yields the endpoint URL. Unknown repos, revisions and files get the Hub's 404 error codes."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _resolve(self):
            prefix = f"/{repo}/resolve/"
            if not self.path.startswith(prefix):
                return self._error(404, "RepoNotFound")
            revision, _, filename = self.path[len(prefix):].partition("/")
            if revision not in commits:
                return self._error(404, "RevisionNotFound")
            data = files.get((revision, filename))
            if data is None:
                return self._error(404, "EntryNotFound")
            self.send_response(200)
            self.send_header("X-Repo-Commit", commits[revision])
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return data

        def _error(self, code, kind):
            self.send_response(code)
            self.send_header("X-Error-Code", kind)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):
            self._resolve()

        def do_GET(self):
            data = self._resolve()
            if data:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
