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

// SplitDocs returns the YAML documents of data that hold more than
// comments.
func SplitDocs(data []byte) ([][]byte, error) {
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

// DecodeStrict decodes one document of deploy/kubernetes into the
// k8s.io/api type its apiVersion and kind name; an unknown field or a
// duplicate is an error.
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

// DecodeFile decodes every object of one manifest file.
func DecodeFile(file string) ([]runtime.Object, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	docs, err := SplitDocs(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	var objs []runtime.Object
	for i, doc := range docs {
		obj, err := DecodeStrict(doc)
		if err != nil {
			return nil, fmt.Errorf("%s, document %d: %w", file, i+1, err)
		}
		objs = append(objs, obj)
	}
	return objs, nil
}

// Create makes obj, one of the kinds namespace.yaml and rbac.yaml hold.
func Create(ctx context.Context, cs *kubernetes.Clientset, obj runtime.Object) error {
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
		return fmt.Errorf("creating a %T: not a kind this package applies", obj)
	}
	if err != nil {
		return fmt.Errorf("creating %T %s: %w", obj, obj.(metav1.Object).GetName(), err)
	}
	return nil
}

// Smeshd applies deploy/kubernetes/namespace.yaml and rbac.yaml as shipped
// and returns a config that reaches the API server as smeshd's
// ServiceAccount (smesh-system/smeshd), as the DaemonSet's pods do, once
// the API server's authorizer lets that ServiceAccount list pods.
func (cp *ControlPlane) Smeshd(t testing.TB) *rest.Config {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	admin, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, f := range []string{"namespace.yaml", "rbac.yaml"} {
		objs, err := DecodeFile(filepath.Join(root, "deploy", "kubernetes", f))
		if err != nil {
			t.Fatal(err)
		}
		for _, obj := range objs {
			if err := Create(ctx, admin, obj); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
		}
	}
	sa := cp.ServiceAccount(t, "smesh-system", "smeshd")
	cs, err := kubernetes.NewForConfig(sa)
	if err != nil {
		t.Fatal(err)
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
				t.Fatalf("SelfSubjectAccessReview as smeshd: %v", err)
			}
			if r.Status.Allowed {
				break
			}
		}
	}
	return sa
}
