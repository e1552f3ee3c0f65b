package kubecp

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// kinds are the objects deploy/kubernetes may hold, by apiVersion and kind,
// each with the Go type it must decode into.
var kinds = map[string]func() runtime.Object{
	"v1/Namespace":      func() runtime.Object { return &corev1.Namespace{} },
	"v1/ServiceAccount": func() runtime.Object { return &corev1.ServiceAccount{} },
	"v1/ConfigMap":      func() runtime.Object { return &corev1.ConfigMap{} },
	"rbac.authorization.k8s.io/v1/ClusterRole":        func() runtime.Object { return &rbacv1.ClusterRole{} },
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding": func() runtime.Object { return &rbacv1.ClusterRoleBinding{} },
	"apps/v1/DaemonSet":                               func() runtime.Object { return &appsv1.DaemonSet{} },
}

// DecodeFile decodes the objects of one manifest of deploy/kubernetes, as
// shipped, with DecodeStrict.
func DecodeFile(path string) ([]runtime.Object, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	docs, err := SplitDocuments(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var objs []runtime.Object
	for i, doc := range docs {
		obj, err := DecodeStrict(doc)
		if err != nil {
			return nil, fmt.Errorf("%s, document %d: %w", path, i+1, err)
		}
		objs = append(objs, obj)
	}
	return objs, nil
}

// SplitDocuments returns the YAML documents of data that hold more than
// comments.
func SplitDocuments(data []byte) ([][]byte, error) {
	r := k8syaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		var probe map[string]any
		if err := yaml.Unmarshal(doc, &probe); err != nil {
			return nil, err
		}
		if len(probe) > 0 {
			docs = append(docs, doc)
		}
	}
}

// DecodeStrict decodes one document into the k8s.io/api type its
// apiVersion and kind name; an unknown field or a duplicate is an error.
func DecodeStrict(doc []byte) (runtime.Object, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, err
	}
	mk, ok := kinds[tm.APIVersion+"/"+tm.Kind]
	if !ok {
		return nil, errors.New("unexpected object " + tm.APIVersion + " " + tm.Kind)
	}
	obj := mk()
	// As the API server decodes: case-sensitive field names, no unknown or
	// duplicate fields (encoding/json alone would take "hostPid").
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, err
	}
	strict, err := sigsjson.UnmarshalStrict(js, obj, sigsjson.DisallowDuplicateFields, sigsjson.DisallowUnknownFields)
	if err != nil {
		return nil, err
	}
	if len(strict) > 0 {
		return nil, errors.Join(strict...)
	}
	return obj, nil
}

// Apply creates the objects of the manifests at paths (namespace.yaml,
// rbac.yaml), as shipped.
func Apply(ctx context.Context, cs kubernetes.Interface, paths ...string) error {
	for _, p := range paths {
		objs, err := DecodeFile(p)
		if err != nil {
			return err
		}
		for _, obj := range objs {
			if err := Create(ctx, cs, obj); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		}
	}
	return nil
}

// Create makes obj, one of the kinds namespace.yaml and rbac.yaml hold.
func Create(ctx context.Context, cs kubernetes.Interface, obj runtime.Object) error {
	var err error
	switch o := obj.(type) {
	case *corev1.Namespace:
		_, err = cs.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{})
	case *corev1.ServiceAccount:
		_, err = cs.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *rbacv1.ClusterRole:
		_, err = cs.RbacV1().ClusterRoles().Create(ctx, o, metav1.CreateOptions{})
	case *rbacv1.ClusterRoleBinding:
		_, err = cs.RbacV1().ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{})
	default:
		return fmt.Errorf("creating a %T: not a kind kubecp applies", obj)
	}
	if err != nil {
		return fmt.Errorf("creating %T %s: %w", obj, obj.(metav1.Object).GetName(), err)
	}
	return nil
}

// Smeshd applies deploy/kubernetes/namespace.yaml and rbac.yaml as shipped
// and returns a config that reaches the API server as smeshd's
// ServiceAccount (smesh-system/smeshd), as the DaemonSet's pods do, once
// the API server's authorizer lets that ServiceAccount list and watch pods.
func (cp *ControlPlane) Smeshd(t testing.TB) *rest.Config {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sa, err := cp.SmeshdToken(ctx, filepath.Join(root, "deploy", "kubernetes"))
	if err != nil {
		t.Fatal(err)
	}
	return sa
}

// SmeshdToken is Smeshd for a caller that is not a test, with the
// manifests (namespace.yaml, rbac.yaml) in manifestDir.
func (cp *ControlPlane) SmeshdToken(ctx context.Context, manifestDir string) (*rest.Config, error) {
	admin, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		return nil, err
	}
	if err := Apply(ctx, admin, filepath.Join(manifestDir, "namespace.yaml"), filepath.Join(manifestDir, "rbac.yaml")); err != nil {
		return nil, err
	}
	sa, err := cp.Token(ctx, "smesh-system", "smeshd")
	if err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(sa)
	if err != nil {
		return nil, err
	}
	// RBAC bindings take effect once the API server's authorizer cache
	// has them. Whether they grant what they should is deploy's
	// TestRBACOnAPIServer's to say: here only wait, bounded.
	for _, verb := range []string{"list", "watch"} {
		ra := authorizationv1.ResourceAttributes{Verb: verb, Resource: "pods"}
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			r, err := cs.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx,
				&authorizationv1.SelfSubjectAccessReview{Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &ra}},
				metav1.CreateOptions{})
			if err != nil {
				return nil, fmt.Errorf("SelfSubjectAccessReview as smeshd: %w", err)
			}
			if r.Status.Allowed {
				break
			}
		}
	}
	return sa, nil
}
