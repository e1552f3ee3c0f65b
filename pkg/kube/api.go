package kube

import (
	"context"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// Request is one kind of request smeshd makes to the API server, as RBAC
// names it: a verb on a resource of the core API group ("").
type Request struct {
	Verb     string // "list", "watch"
	Resource string // "pods", "namespaces"
	// Namespace is "" for a request across all namespaces, as all of
	// smeshd's are: a node's pods may be in any namespace.
	Namespace string
}

// requests are all the requests smeshd makes. restAPI refuses any other,
// so a new one must be added here, and deploy's RBAC test asks a real API
// server whether deploy/kubernetes/rbac.yaml grants each of them: the code
// and the ClusterRole cannot drift apart.
var requests = []Request{
	{Verb: "list", Resource: "pods"},
	{Verb: "watch", Resource: "pods"},
	{Verb: "list", Resource: "namespaces"},
	{Verb: "watch", Resource: "namespaces"},
}

// Requests returns every request smeshd makes to the API server.
func Requests() []Request { return slices.Clone(requests) }

// NodeSelector is the field selector of smeshd's pod list and watch: the
// pods of node only, filtered by the API server.
func NodeSelector(node string) string {
	return fields.OneTermEqualSelector("spec.nodeName", node).String()
}

// checkRequest returns an error unless verb on resource is in requests.
func checkRequest(verb, resource string) error {
	if !slices.Contains(requests, Request{Verb: verb, Resource: resource}) {
		return fmt.Errorf("kubernetes: %s %s is not among the requests smeshd makes (kube.Requests)", verb, resource)
	}
	return nil
}

// API lists and watches the core API group's resources smeshd reads:
// "pods" and "namespaces", across all namespaces ([Requests]).
type API interface {
	List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error)
	Watch(ctx context.Context, resource string, opts metav1.ListOptions) (watch.Interface, error)
}

// restAPI is API over a REST client whose scheme knows the core group
// only. It makes the requests client-go's typed core client makes
// (GET /api/v1/pods?fieldSelector=...&watch=true ...).
type restAPI struct {
	c      *rest.RESTClient
	params runtime.ParameterCodec
}

// NewAPI returns the API of the server rc reaches.
func NewAPI(rc *rest.Config) (API, error) {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("kubernetes scheme: %w", err)
	}
	cfg := rest.CopyConfig(rc)
	cfg.APIPath = "/api"
	cfg.GroupVersion = &corev1.SchemeGroupVersion
	cfg.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if cfg.UserAgent == "" {
		cfg.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	c, err := rest.RESTClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return restAPI{c: c, params: runtime.NewParameterCodec(scheme)}, nil
}

func (a restAPI) List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error) {
	if err := checkRequest("list", resource); err != nil {
		return nil, err
	}
	var into runtime.Object
	switch resource {
	case "pods":
		into = &corev1.PodList{}
	case "namespaces":
		into = &corev1.NamespaceList{}
	default:
		return nil, fmt.Errorf("kubernetes: listing %s is not supported", resource)
	}
	req := a.c.Get().Resource(resource).VersionedParams(&opts, a.params)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	if err := req.Do(ctx).Into(into); err != nil {
		return nil, err
	}
	return into, nil
}

func (a restAPI) Watch(ctx context.Context, resource string, opts metav1.ListOptions) (watch.Interface, error) {
	if err := checkRequest("watch", resource); err != nil {
		return nil, err
	}
	opts.Watch = true
	req := a.c.Get().Resource(resource).VersionedParams(&opts, a.params)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	return req.Watch(ctx)
}
