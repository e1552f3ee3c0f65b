package kube

import (
	"context"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// Request is one kind of request smeshd makes to the API server, as RBAC
// names it: a verb on a resource of an API group.
type Request struct {
	Verb     string // "list", "watch"
	Group    string // "" (core) or "discovery.k8s.io"
	Resource string // "pods", "namespaces", "services", "endpointslices"
	// Namespace is "" for a request across all namespaces, as all of
	// smeshd's are: a node's pods may be in any namespace, and any pod may
	// connect to a Service of any namespace.
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
	{Verb: "list", Resource: "services"},
	{Verb: "watch", Resource: "services"},
	{Verb: "list", Group: discoveryv1.GroupName, Resource: "endpointslices"},
	{Verb: "watch", Group: discoveryv1.GroupName, Resource: "endpointslices"},
	// Through the dynamic client (PolicyWatcher), not restAPI.
	{Verb: "list", Group: AuthorizationPolicies.Group, Resource: AuthorizationPolicies.Resource},
	{Verb: "watch", Group: AuthorizationPolicies.Group, Resource: AuthorizationPolicies.Resource},
}

// Requests returns every request smeshd makes to the API server.
func Requests() []Request { return slices.Clone(requests) }

// kinds are the resources API reads, each with its group and the type its
// list decodes into. Resource names are unique across these groups, so
// callers name a resource alone.
var kinds = map[string]struct {
	group string
	list  func() runtime.Object
}{
	"pods":           {"", func() runtime.Object { return &corev1.PodList{} }},
	"namespaces":     {"", func() runtime.Object { return &corev1.NamespaceList{} }},
	"services":       {"", func() runtime.Object { return &corev1.ServiceList{} }},
	"endpointslices": {discoveryv1.GroupName, func() runtime.Object { return &discoveryv1.EndpointSliceList{} }},
}

// NodeSelector is the field selector of smeshd's pod list and watch: the
// pods of node only, filtered by the API server.
func NodeSelector(node string) string {
	return fields.OneTermEqualSelector("spec.nodeName", node).String()
}

// checkRequest returns an error unless verb on resource (of the group
// kinds gives it) is in requests.
func checkRequest(verb, resource string) error {
	if !slices.Contains(requests, Request{Verb: verb, Group: kinds[resource].group, Resource: resource}) {
		return fmt.Errorf("kubernetes: %s %s is not among the requests smeshd makes (kube.Requests)", verb, resource)
	}
	return nil
}

// API lists and watches the resources smeshd reads ("pods", "namespaces",
// "services", "endpointslices"), across all namespaces ([Requests]).
type API interface {
	List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error)
	Watch(ctx context.Context, resource string, opts metav1.ListOptions) (watch.Interface, error)
}

// restAPI is API over one REST client per API group, each with a scheme
// of that group alone (core: /api/v1, discovery.k8s.io: /apis/...). It
// makes the requests client-go's typed clients make
// (GET /api/v1/pods?fieldSelector=...&watch=true ...).
type restAPI struct {
	groups map[string]restGroup // by API group name
}

type restGroup struct {
	c      *rest.RESTClient
	params runtime.ParameterCodec
}

// NewAPI returns the API of the server rc reaches.
func NewAPI(rc *rest.Config) (API, error) {
	core, err := newRESTGroup(rc, "/api", corev1.SchemeGroupVersion, corev1.AddToScheme)
	if err != nil {
		return nil, err
	}
	discovery, err := newRESTGroup(rc, "/apis", discoveryv1.SchemeGroupVersion, discoveryv1.AddToScheme)
	if err != nil {
		return nil, err
	}
	return restAPI{groups: map[string]restGroup{"": core, discoveryv1.GroupName: discovery}}, nil
}

func newRESTGroup(rc *rest.Config, path string, gv schema.GroupVersion, add func(*runtime.Scheme) error) (restGroup, error) {
	scheme := runtime.NewScheme()
	if err := add(scheme); err != nil {
		return restGroup{}, fmt.Errorf("kubernetes scheme %s: %w", gv, err)
	}
	cfg := rest.CopyConfig(rc)
	cfg.APIPath = path
	cfg.GroupVersion = &gv
	cfg.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if cfg.UserAgent == "" {
		cfg.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	c, err := rest.RESTClientFor(cfg)
	if err != nil {
		return restGroup{}, fmt.Errorf("kubernetes client %s: %w", gv, err)
	}
	return restGroup{c: c, params: runtime.NewParameterCodec(scheme)}, nil
}

func (a restAPI) List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error) {
	if err := checkRequest("list", resource); err != nil {
		return nil, err
	}
	k := kinds[resource]
	into := k.list()
	g := a.groups[k.group]
	req := g.c.Get().Resource(resource).VersionedParams(&opts, g.params)
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
	g := a.groups[kinds[resource].group]
	req := g.c.Get().Resource(resource).VersionedParams(&opts, g.params)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	return req.Watch(ctx)
}
