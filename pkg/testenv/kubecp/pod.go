package kubecp

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// serviceAccountDir is where a pod finds its ServiceAccount's token, CA
// and namespace, and client-go's in-cluster configuration reads them.
const serviceAccountDir = "/run/secrets/kubernetes.io/serviceaccount"

// WriteServiceAccount writes into dir what the kubelet mounts at
// serviceAccountDir in a pod of namespace: the token and the API server's
// CA. InPod puts dir there.
func WriteServiceAccount(dir, namespace, token string, ca []byte) error {
	for name, data := range map[string][]byte{"token": []byte(token), "ca.crt": ca, "namespace": []byte(namespace)} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return fmt.Errorf("writing the service account: %w", err)
		}
	}
	return nil
}

// InPod returns the command that runs a program as the kubelet runs it in
// a pod on node: the ServiceAccount files of saDir (WriteServiceAccount)
// at serviceAccountDir, on a tmpfs /run in a mount namespace of its own
// (the host's /run is not touched), NODE_NAME as the DaemonSet sets it,
// and the API server at KUBERNETES_SERVICE_HOST and _PORT. The program and
// its arguments follow the returned words; unshare is the path of
// util-linux's unshare. sh execs the program, so the process is the
// program's.
func InPod(unshare, saDir, node, apiHost string, apiPort int) []string {
	script := fmt.Sprintf(`set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p %[1]s
cp %[2]s/token %[2]s/ca.crt %[2]s/namespace %[1]s/
exec env NODE_NAME=%[3]s KUBERNETES_SERVICE_HOST=%[4]s KUBERNETES_SERVICE_PORT=%[5]s "$@"`,
		serviceAccountDir, saDir, node, apiHost, strconv.Itoa(apiPort))
	return []string{unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh"}
}
