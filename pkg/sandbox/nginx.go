package sandbox

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteNginxConfig writes root/nginx.conf for one nginx process (no master,
// no daemon, so it is stopped by its PID) that serves the files of root on
// listen and keeps every file it writes inside root; it returns the path.
// Run it as `nginx -p root -c PATH`. Tests and the demo use it as a real
// server nobody here wrote.
func WriteNginxConfig(root, listen string) (string, error) {
	return WriteNginxConfigLogged(root, root, listen, "")
}

// WriteNginxConfigLogged is WriteNginxConfig serving the files of docs, and
// logging every request's client address and port, request, status and
// size to accessLog ("" for no log).
func WriteNginxConfigLogged(root, docs, listen, accessLog string) (string, error) {
	logging := "access_log off;"
	if accessLog != "" {
		logging = fmt.Sprintf("log_format peer '$remote_addr:$remote_port \"$request\" $status $body_bytes_sent';\n\taccess_log %s peer;", accessLog)
	}
	conf := fmt.Sprintf(`user root;
master_process off;
daemon off;
pid %[1]s/nginx.pid;
error_log stderr;
events {}
http {
	%[4]s
	client_body_temp_path %[1]s;
	proxy_temp_path %[1]s;
	fastcgi_temp_path %[1]s;
	uwsgi_temp_path %[1]s;
	scgi_temp_path %[1]s;
	server {
		listen %[2]s;
		root %[3]s;
	}
}
`, root, listen, docs, logging)
	path := filepath.Join(root, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return "", err
	}
	return path, nil
}
